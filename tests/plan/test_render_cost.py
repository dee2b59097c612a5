"""The renderer's analytic cost in `fica plan` (fica_jax/plan/render_cost.py), and the UPM train
step compiled for a v5p slice with the TPU compositing kernel in it (deviceless, libtpu)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fica_jax.plan import render_cost as rc
from fica_jax.plan import topology
from fica_jax.render import rasterization
from fica_jax.train.stage import RenderCall


def test_jaxpr_ops_count_by_element():
    def f(x, y):  # [8, 4] each: mul 32, exp 32, sum over axis 1 reads 32, add 8; broadcast free
        z = jnp.exp(x * y)
        return jnp.sum(z, axis=1) + jnp.broadcast_to(1.0, (8,))

    x = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    assert rc.jaxpr_ops(jax.make_jaxpr(f)(x, x).jaxpr) == 32 + 32 + 32 + 8


def test_ops_per_pair_is_the_chunk_step_over_its_block():
    ops = rc.ops_per_pair(3, 16, 128)
    # gsplat's inner loop is ~20 flops per pair; ours adds the log-step scans (7 steps of roll,
    # select, multiply on the block) and the per-pixel reductions: ~100-150 either way
    assert 80 < ops["forward"] < 200 and 80 < ops["backward"] < 250
    # more colour channels cost more; the count does not depend on the tile size per pair much
    assert rc.ops_per_pair(4, 16, 128)["forward"] > ops["forward"]
    assert abs(rc.ops_per_pair(3, 8, 128)["forward"] - ops["forward"]) < 0.2 * ops["forward"]


def test_frame_pairs_match_the_renderer():
    f = rc.frame_pairs(48 * 48, 128, 16, 128)
    s = rc.head_gaussians(48, full=True)
    vm, K = rc.frontal_camera(128)
    _, _, meta = rasterization(**s, viewmats=vm, Ks=K, width=128, height=128)
    assert f["n_isects"] == int(meta["n_isects"][0]) > 0
    assert f["max_tile_count"] == int(meta["max_tile_count"][0])
    # whole chunks at every pixel of the tile: at least n_isects x 256, at most one chunk more
    # per tile
    assert f["n_isects"] * 256 <= f["pairs"] <= (f["n_isects"] + 128 * f["tiles"]) * 256


def test_renderer_cost_and_split_arithmetic():
    r = RenderCall("frame", 32 * 32, 64, 16, 3, forward=2, backward=1)
    cost = rc.renderer_cost([r], ["v5p", "v6e"], devices=4, global_batch=8)
    row = cost["renders"][0]
    pairs, ops = row["frame"]["pairs"], row["ops_per_pair"]
    expect = 2 * (2 * pairs * ops["forward"] + pairs * ops["backward"])  # 2 examples per device
    assert math.isclose(cost["vector_ops"], expect, rel_tol=1e-9)
    from fica_jax.perf.chips import CHIPS

    assert math.isclose(cost["kernel_s"]["v5p"], expect / CHIPS["v5p"].vector_ops_per_s)
    assert cost["kernel_s"]["v6e"] is None  # no vector figure for it
    split = rc.renderer_split({"v5p": {"step_s": 0.3}, "v6e": {"step_s": 0.1}},
                              {"v5p": 0.1, "v6e": None})  # fmt: skip
    assert math.isclose(split["v5p"]["step_s"], 0.4)
    assert math.isclose(split["v5p"]["renderer_share"], 0.25)
    assert "note" in split["v6e"]


def test_kernel_calls_read_the_hlo():
    text = "\n".join([
        '  %a = f32[2] custom-call(f32[2] %x), custom_call_target="tpu_custom_call", '
        'metadata={op_name="jit(f)/fica_composite_fwd"}',
        '  %b = f32[2] fusion(%a), metadata={op_name="fica_composite_fwd"}',
        '  %c = f32[2] custom-call(%b), custom_call_target="tpu_custom_call" fica_composite_bwd',
    ])  # fmt: skip
    assert rc.kernel_calls(text) == {"fica_composite_fwd": 1, "fica_composite_bwd": 1}


@pytest.mark.heavy
@pytest.mark.multiprocess
def test_upm_train_step_with_the_kernel_compiles_for_v5p():
    """The UPM's whole train step (forward, loss, backward through the kernels, optimizer),
    compiled by libtpu's TPU compiler for a v5p:2x2x1 slice that is not there."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None and not topology.LIBTPU_DIR.is_dir():
        pytest.skip(f"libtpu not installed (.ci/run puts it in {topology.LIBTPU_DIR})")
    from fica_jax.plan.planner import plan_in_subprocess

    report = plan_in_subprocess("configs/upm.py:tiny", "data=4", "v5p", topology="v5p:2x2x1")
    assert report["compiler"].startswith("tpu (v5p:2x2x1")
    r = report["renderer"]
    calls = r["kernels_in_step"]
    assert calls["fica_composite_fwd"] >= 1 and calls["fica_composite_bwd"] >= 1, calls
    step = r["step"]["v5p"]
    assert 0 < step["renderer_share"] < 1 and step["step_s"] > step["hlo_step_s"] > 0
    assert report["roofline"]["v5p"]["fits_hbm"]
    assert np.isfinite(r["vector_ops"]) and r["vector_ops"] > 0
