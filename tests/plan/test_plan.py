"""`fica plan` (AOT compile for a virtual mesh), HLO FLOP/collective counting, golden shardings
(per-op byte and FLOP costs: `test_op_costs.py`).

Regenerate a golden file after an intended layout change (and review the diff):
  python -m fica_jax.plan.planner --golden configs/dit.py:paper --mesh data=8,fsdp=8 \
      --out tests/golden/sharding_dit_paper.json
  python -m fica_jax.plan.planner --golden configs/toy.py:wide --mesh data=8,fsdp=8 \
      --out tests/golden/sharding_toy_wide.json
"""

import dataclasses
import json
import pathlib

import pytest

import fica_jax  # noqa: F401
from fica_jax import sharding as shd
from fica_jax.commands import train as cli
from fica_jax.config import load_config
from fica_jax.errors import UserError
from fica_jax.perf.hlo_stats import analyze
from fica_jax.plan import planner as plan
from fica_jax.plan import topology
from fica_jax.train.stage import get_stage
from fica_jax.train.step import build

REPO = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = {  # name: (config, golden file); a config not yet in the repo is skipped
    "toy_wide": ("configs/toy.py:wide", "sharding_toy_wide.json"),
    "dit_paper": ("configs/dit.py:paper", "sharding_dit_paper.json"),
}


def _toy_forward_flops_per_example(din=16, width=32, depth=2, dout=8) -> int:
    return 2 * (din * width + depth * 2 * (width * 2 * width) + width * dout)


def _toy_dot_flops_per_example(din=16, width=32, depth=2, dout=8, remat="none") -> int:
    """Forward + weight grads + input grads (none for the data input); remat "full" recomputes
    each block's first MLP matmul in the backward pass (the second one's output is not needed
    there, so XLA drops its recomputation)."""
    fwd = _toy_forward_flops_per_example(din, width, depth, dout)
    recompute = depth * 2 * (width * 2 * width) if remat == "full" else 0
    return 3 * fwd - 2 * din * width + recompute


def _same_taps(size: int, kernel: int, stride: int) -> int:
    """(output, tap) pairs of a 'SAME' conv along one dim that read a real (unpadded) input."""
    out = -(-size // stride)
    lo = max((out - 1) * stride + kernel - size, 0) // 2
    return sum(0 <= o * stride + t - lo < size for o in range(out) for t in range(kernel))


def _dit_forward_flops(c, batch: int, side: int) -> int:
    """Dot/conv FLOPs of one forward of `fica_jax/models/dit.py`'s DiT, derived from the code:
    `batch` sequences of a `side` x `side` latent, DiTConfig `c` (docs/architecture.md §2)."""
    d, p, hid, cin = c.width, c.patch, int(c.width * c.mlp_ratio), c.in_channels
    n = (side // p) ** 2  # tokens
    lin = lambda rows, din, dout: 2 * rows * din * dout  # a Linear on `rows` rows
    emb_in = cin + (c.control_channels if c.control_concat else 0)  # + the concatenated control
    f = lin(batch * n, p * p * emb_in, d)  # patch_embed
    f += lin(batch, c.freq_dim, d) + lin(batch, d, d)  # t_embed (per sample)
    f += lin(batch, c.image_emb_dim, d)  # image_proj; domain_embed is a gather
    block = lin(batch, d, 6 * d)  # adaLN modulation (per sample)
    block += 4 * lin(batch * n, d, d)  # q, k, v, out
    block += 2 * (2 * batch * n * n * d)  # q.k^T and probs.v over all heads
    block += lin(batch * n, d, hid) + lin(batch * n, hid, d)  # MLP
    if c.control_channels:
        f += lin(batch, c.freq_dim, d) + lin(batch, d, d)  # control_t_embed
        k = max(3, p)  # ControlMLP: conv3x3 Cc -> D, conv k/stride p D -> 2D, conv1x1 2D -> D
        f += 2 * batch * c.control_channels * d * _same_taps(side, 3, 1) ** 2
        f += 2 * batch * d * 2 * d * _same_taps(side, k, p) ** 2
        f += lin(batch * n, 2 * d, d)
        block += lin(batch, d, 2 * d) + lin(batch * n, d, d)  # ZeroControl mod (per sample), proj
    f += c.depth * block
    f += lin(batch, d, 2 * d) + lin(batch * n, d, p * p * cin)  # final adaLN + linear
    return f


@pytest.mark.heavy
def test_fica_plan_toy_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--config", "configs/toy.py", "--mesh", "data=2,fsdp=4", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert report["param_count"] == 9320
    b = report["per_device_bytes"]
    assert 0 < b["params"] < 4 * 9320  # sharded: less than the full f32 params on each device
    assert b["optimizer_state"] >= 2 * b["params"]  # Adam's mu and nu mirror the params
    assert b["temp_activations"] > 0
    f = report["flops"]
    assert f["while_trip_counts"] == [2, 2]  # scanned blocks forward and backward
    assert f["per_device_per_step"] == _toy_dot_flops_per_example() * 16 / 8
    assert f["hardware_per_device_per_step"] == f["per_device_per_step"]
    assert f["model_global_per_step"] == 3 * _toy_forward_flops_per_example() * 16
    c = report["collective_bytes_per_device"]
    assert c["total"] > 0 and "reduce-scatter" in c  # grads reduced onto fsdp shards
    assert c["total"] < c["cpu_compiled"]["total"]  # all-reduce + slice counted as one RS
    assert set(report["roofline"]) == {"v5p", "v6e", "a100", "h100"}
    _check_mfu_is_model_flops(report)


def _check_mfu_is_model_flops(report):
    """MaxText MFU: model FLOPs / (peak x predicted step time), overlapped and serial; the step
    time is the per-op roofline (compute or HBM bound per op) against the collectives."""
    from fica_jax.perf.chips import CHIPS

    model = report["flops"]["model_per_device_per_step"]
    hw = report["flops"]["hardware_per_device_per_step"]
    for chip, r in report["roofline"].items():
        peak = CHIPS[chip].peak_flops
        ops_s = r["op_roofline_s"] + r["async_copy_s"]  # every op, at its own roofline
        assert ops_s >= max(r["compute_s"], r["hbm_s"]) * (1 - 1e-9)
        assert r["step_s"] == max(r["op_roofline_s"], r["hbm_s"], r["collective_s"])
        assert r["step_s_no_overlap"] == pytest.approx(ops_s + r["collective_s"])
        assert r["compute_s"] == pytest.approx(hw / peak)
        assert r["mfu"] == pytest.approx(model / (peak * r["step_s"]))
        assert r["mfu_no_overlap"] == pytest.approx(model / (peak * r["step_s_no_overlap"]))
        assert r["hfu"] == pytest.approx(hw / (peak * r["step_s"]))
        assert 0 < r["mfu_no_overlap"] <= r["mfu"] <= 1
    top = report["top_ops"]
    kinds = top["by_kind"].values()
    r = report["roofline"][top["chip"]]
    assert sum(k["seconds"] for k in kinds) == pytest.approx(r["op_roofline_s"] + r["async_copy_s"])
    assert sum(k["flops"] for k in kinds) == pytest.approx(hw)  # every dot sits in some op
    assert 0 < len(top["top"]) <= 10


@pytest.mark.multiprocess
def test_fica_plan_mfu_excludes_remat_recompute():
    """With remat=full the hardware runs the blocks' forward twice; model FLOPs (and so MFU) do
    not count it: hardware/model > 1, and MFU < 1 even where the step is compute-bound."""
    report = plan.plan_in_subprocess(
        "configs/toy.py", "data=2,fsdp=4", "v5p", ["--config.train.remat=full"]
    )
    f = report["flops"]
    assert f["hardware_per_device_per_step"] == _toy_dot_flops_per_example(remat="full") * 2
    assert f["model_per_device_per_step"] == 3 * _toy_forward_flops_per_example() * 2
    assert f["hardware_over_model"] > 1.1
    _check_mfu_is_model_flops(report)
    r = report["roofline"]["v5p"]
    assert r["mfu"] < r["hfu"]
    compute_bound = plan.roofline(
        f["hardware_per_device_per_step"], f["model_per_device_per_step"], 0.0, 0.0, ["v5p"]
    )["v5p"]
    assert compute_bound["hfu"] == 1.0
    assert compute_bound["mfu"] == pytest.approx(1 / f["hardware_over_model"]) and (
        compute_bound["mfu"] < 1
    )


@pytest.mark.heavy
def test_model_flops_match_analytic_dit():
    """`plan.model_flops` (3 x the HLO-counted forward, remat off) against a hand count of the
    DiT's matmuls, convs and attention: the bare model, and the `dit` stage's two-domain loss
    (texture and geometry rows in one call: 2 x batch sequences)."""
    from fica_jax.models import dit
    from fica_jax.stages.dit import dit_config

    side, batch = 8, 4
    for cfg_dit in (dit.VARIANTS["tiny"], dataclasses.replace(dit.VARIANTS["tiny"], patch=4)):
        probe = _dit_probe_stage(cfg_dit, batch, side)
        cfg = load_config("configs/toy.py", ["--config.train.remat=full"])
        assert plan.model_flops(cfg, probe) == 3 * _dit_forward_flops(cfg_dit, batch, side)

    cfg = load_config("configs/dit.py:tiny", ["--config.train.remat=full"])
    m = cfg.model
    want = 3 * _dit_forward_flops(dit_config(cfg), 2 * cfg.data.batch_size, m.latent_size)
    assert plan.model_flops(cfg, get_stage("dit")) == want


def _dit_probe_stage(c, batch: int, side: int):
    """A stage whose loss is one plain DiT forward (mean square of the velocity)."""
    import jax
    import jax.numpy as jnp

    from fica_jax.models import dit
    from fica_jax.train.stage import Stage

    def make_model(cfg, rngs):
        return dit.DiT(dataclasses.replace(c, remat=cfg.train.remat), rngs=rngs)

    def make_loss(cfg):
        def loss(model, b, rng):
            drop = jnp.zeros((batch,), bool)
            v = model(b["x"], b["t"], b["emb"], b["domain"], b["control"], drop)
            return jnp.mean(v**2), {}

        return loss

    def spec(cfg):
        f = jnp.float32
        return {
            "x": jax.ShapeDtypeStruct((batch, side, side, c.in_channels), f),
            "t": jax.ShapeDtypeStruct((batch,), f),
            "emb": jax.ShapeDtypeStruct((batch, c.image_emb_dim), f),
            "domain": jax.ShapeDtypeStruct((batch,), jnp.int32),
            "control": jax.ShapeDtypeStruct((batch, side, side, c.control_channels), f),
        }

    # planned, never trained: no data
    return Stage(name="dit_probe", rules="dit", make_model=make_model, make_loss=make_loss,
                 make_data=lambda *args: (), batch_spec=spec)  # fmt: skip


def test_plan_rejects_bad_mesh_and_chips():
    with pytest.raises(UserError, match="--mesh 'data=8,pipe=2'"):
        plan.parse_mesh("data=8,pipe=2")
    with pytest.raises(UserError, match="unknown \\['tpu9'\\]"):
        plan.parse_chips("v5p,tpu9")


@pytest.mark.heavy
def test_hlo_flops_count_scan_trip_counts():
    """The HLO counter multiplies scanned bodies; XLA's cost analysis would count them once."""
    mesh = shd.make_mesh({"data": 8})
    counts = {}
    for depth in (2, 4):
        cfg = load_config("configs/toy.py", [f"--config.model.depth={depth}"])
        stats = analyze(build(cfg, get_stage("toy"), mesh).lower().compile().as_text())
        assert stats.while_trip_counts == [depth, depth]
        counts[depth] = stats.flops
        assert stats.flops == _toy_dot_flops_per_example(depth=depth) * 16 / 8
    assert counts[4] > counts[2]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_param_shardings_match_golden(name):
    config, golden = GOLDEN[name]
    path = REPO / "tests" / "golden" / golden
    assert path.exists(), f"missing {path}; regenerate it as in this module's docstring"
    table = plan.sharding_table(load_config(config), {"data": 8, "fsdp": 8})
    assert table == json.loads(path.read_text())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fica_plan_dit_tiny(tmp_path):
    """The DiT's scanned blocks show up as a while loop with the config's depth as trip count."""
    report = plan.plan_in_subprocess("configs/dit.py:tiny", "data=2,fsdp=4", "v5p")
    from fica_jax.models.dit import VARIANTS

    depth = load_config("configs/dit.py:tiny").model.depth or VARIANTS["tiny"].depth
    assert report["flops"]["while_trip_counts"].count(depth) == 2  # forward and backward scans
    assert report["flops"]["per_device_per_step"] > 0
    assert report["per_device_bytes"]["params"] < 4 * report["param_count"]


def _libtpu_or_skip() -> None:
    import importlib.util

    if importlib.util.find_spec("libtpu") is None and not topology.LIBTPU_DIR.is_dir():
        pytest.skip(f"libtpu not installed (.ci/run puts it in {topology.LIBTPU_DIR})")


@pytest.mark.multiprocess
def test_fica_plan_with_the_tpu_compiler():
    """`--topology`: the same train step compiled by libtpu's TPU compiler for a v5p slice that
    is not here. Same hardware FLOPs as the CPU plan (same dots, whoever fuses them), the
    collectives as the TPU sends them, the TPU's own memory analysis, and a roofline for v5p
    alone."""
    _libtpu_or_skip()
    tpu = plan.plan_in_subprocess("configs/toy.py", "data=2,fsdp=4", "v5p,a100", [], "v5p:2x2x2")
    cpu = plan.plan_in_subprocess("configs/toy.py", "data=2,fsdp=4", "v5p")
    assert tpu["compiler"].startswith("tpu (v5p:2x2x2") and cpu["compiler"].startswith("cpu")
    assert set(tpu["roofline"]) == {"v5p"}  # the program is a v5p's; no other chip's row
    f_tpu, f_cpu = tpu["flops"], cpu["flops"]
    assert f_tpu["hardware_per_device_per_step"] == pytest.approx(
        f_cpu["hardware_per_device_per_step"], rel=1e-6
    )
    assert f_tpu["model_per_device_per_step"] == f_cpu["model_per_device_per_step"]
    coll = tpu["collective_bytes_per_device"]
    assert coll["total"] > 0 and coll["source"].startswith("TPU-compiled")
    # bf16 stays bf16 on a TPU: never more than the CPU executable's f32-upcast collectives
    assert coll["total"] <= cpu["collective_bytes_per_device"]["cpu_compiled"]["total"]
    assert tpu["per_device_bytes"]["peak_estimate"] > tpu["per_device_bytes"]["params"] > 0
    _check_mfu_is_model_flops(tpu)


@pytest.mark.multiprocess
def test_fica_plan_topology_errors_are_one_line(capsys):
    chip = topology.topology_chip
    with pytest.raises(UserError, match=r"--topology 'v5x:4x4': expected CHIP:AxBxC"):
        chip("v5x:4x4")
    assert chip("v5p:4x4x4") == "v5p" and chip("v6e:8x8") == "v6e"
    _libtpu_or_skip()
    with pytest.raises(UserError, match=r"needs 8 devices; --topology v5p:2x2x1 has 4"):
        plan.plan_in_subprocess("configs/toy.py", "data=2,fsdp=4", "v5p", [], "v5p:2x2x1")
