"""`dense` train-step speed on CPU: the heads' x2 upsampling as a transposed conv vs sub-pixel.

  nice -n 10 taskset -c 1 python benchmarks/dense_step.py     # the demo's shape, ~6 min
  python benchmarks/dense_step.py --devices 8                 # on 8 fake CPU devices (tests)

Writes benchmarks/results/dense_step_cpu.json (through results_io). The shape is the demo's
(`fica demo`: `configs/dense.py:tiny` at 128 px, batch 8, width 64 x 4 blocks, patch 8, heads of
32 channels, `mesh.fsdp=-1`); `fica demo` runs `fica train` in-process without fake devices, so
the default is 1 device. In one process, for each implementation of `DenseHead`'s deconvs:

  transposed  the previous layer, `nnx.ConvTranspose(k=4, s=2, padding=2)` (zero-dilated input)
  conv        `dense_heads.upsample_conv_x2(impl="conv")`: one 2x2 conv with 4*cout outputs
  dot         `upsample_conv_x2(impl="dot")`: the same as im2col + one matmul (the CPU default)

1. the full train step (`fica_jax.train.step.build`: forward, backward, AdamW) compiled once and
   timed after warm-up, implementations alternating round by round so background load hits all
   alike (median step time -> steps/s; first-step losses must agree: same parameters);
2. per-part ms (min over repeats, each part jitted alone): backbone and the four heads, forward
   and forward+backward; and inside one head each deconv / InstanceNorm+SiLU / final conv.
   `gflops` are XLA's `cost_analysis()` counts: about equal for all three (XLA does not count the
   transposed form's multiplies by inserted zeros), so the gap is XLA CPU's slow path for convs
   over a dilated input and for their kernel gradients, not arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_result  # noqa: E402


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices (the demo: 1)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=0, help="0: the tiny config's (8)")
    p.add_argument("--impls", default="transposed,conv,dot")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation")
    p.add_argument("--part-repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dense_step_cpu.json"))
    p.add_argument("--no-write", action="store_true")
    return p.parse_args()


ARGS = _args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if ARGS.devices > 1:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fica_jax import sharding as shd  # noqa: E402
from fica_jax.config import load_config  # noqa: E402
from fica_jax.models import dense_heads, vit  # noqa: E402
from fica_jax.train import step as step_lib  # noqa: E402
from fica_jax.train.stage import get_stage  # noqa: E402

_SUBPIXEL = dense_heads.upsample_conv_x2


def _transposed(cin, cout, *, rngs, dtype=None, param_dtype=jnp.float32):
    """The layer `DenseHead` used before the sub-pixel form (same parameter, same init)."""
    return nnx.ConvTranspose(
        cin,
        cout,
        kernel_size=(4, 4),
        strides=(2, 2),
        padding=((2, 2), (2, 2)),
        use_bias=False,
        kernel_init=dense_heads._DECONV_INIT,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


@contextlib.contextmanager
def implementation(name: str):
    """Makes `DenseHead` build (and trace) its deconvs with implementation `name`."""
    saved = dense_heads.ConvTransposeX2, dense_heads.upsample_conv_x2
    if name == "transposed":
        dense_heads.ConvTransposeX2 = _transposed
    else:
        dense_heads.upsample_conv_x2 = functools.partial(_SUBPIXEL, impl=name)
    try:
        yield
    finally:
        dense_heads.ConvTransposeX2, dense_heads.upsample_conv_x2 = saved


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return float((ca or {}).get("flops", 0.0))


def _time_part(fn, *args) -> dict:
    """min ms over --part-repeats calls of jit(fn)(*args) after one warm call, and its flops."""
    c = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(c(*args))
    ts = []
    for _ in range(ARGS.part_repeats):
        t = time.perf_counter()
        jax.block_until_ready(c(*args))
        ts.append(time.perf_counter() - t)
    return {"ms": round(1e3 * min(ts), 2), "gflops": round(_flops(c) / 1e9, 3)}


def _fwd_bwd(f):
    """(params, x) -> grads of sum(f(params, x)^2) wrt both."""
    return jax.grad(lambda p, x: jnp.sum(jnp.square(f(p, x))), argnums=(0, 1))


def parts(cfg, stage, images) -> dict:
    """Per-part timings of the model (built and traced under the current implementation)."""
    model = stage.make_model(cfg, nnx.Rngs(0))
    gd, state = nnx.split(model)
    backbone = lambda s, x: nnx.merge(gd, s).backbone(vit.normalize(x))
    heads = lambda s, f: [nnx.merge(gd, s).head(n)(f) for n in vit.HEADS]
    feats = jax.jit(backbone)(state, images)
    out = {
        "backbone_fwd": _time_part(backbone, state, images),
        "backbone_fwd_bwd": _time_part(_fwd_bwd(backbone), state, images),
        "heads_fwd": _time_part(heads, state, feats),
        "heads_fwd_bwd": _time_part(
            _fwd_bwd(lambda s, f: jnp.stack([jnp.sum(y) for y in heads(s, f)])), state, feats
        ),
    }
    head = model.head(next(iter(vit.HEADS)))
    x = feats
    norm = lambda _, y: nnx.silu(dense_heads.instance_norm(y))
    for i, layer in enumerate(head.deconvs):
        g, s = nnx.split(layer)
        f = lambda s, x, g=g: nnx.merge(g, s)(x)
        out[f"head.deconv{i}_{x.shape[1]}px_fwd_bwd"] = _time_part(_fwd_bwd(f), s, x)
        x = jax.jit(f)(s, x)
        out[f"head.norm_silu{i}_{x.shape[1]}px_fwd_bwd"] = _time_part(_fwd_bwd(norm), None, x)
        x = norm(None, x)
    g, s = nnx.split(head.final)
    final = lambda s, x: nnx.merge(g, s)(x)
    out["head.final_fwd_bwd"] = _time_part(_fwd_bwd(final), s, x)
    return out


def main() -> None:
    overrides = [
        f"--config.data.image_size={ARGS.image_size}",
        "--config.mesh.fsdp=-1",
        "--config.data.dir=unused",
    ]
    if ARGS.batch:
        overrides.append(f"--config.data.batch_size={ARGS.batch}")
    cfg = load_config("dense:tiny", overrides)
    stage = get_stage("dense")
    mesh = shd.make_mesh(dict(cfg.mesh))
    rng = np.random.default_rng(0)
    host = {}
    for k, s in stage.batch_spec(cfg).items():
        host[k] = rng.uniform(0, 1, s.shape).astype(s.dtype)
    host["mask"] = (host["mask"] > 0.5).astype(np.float32)
    host["nrm"] /= np.linalg.norm(host["nrm"], axis=-1, keepdims=True)
    impls = ARGS.impls.split(",")

    runs, result = {}, {"rows": []}
    for name in impls:
        with implementation(name):
            setup = step_lib.build(cfg, stage, mesh)
            batch = shd.put_batch(host, mesh)
            state = setup.init()
            t = time.perf_counter()
            compiled = setup.lower(state, batch).compile()
            compile_s = time.perf_counter() - t
        runs[name] = dict(setup=setup, compiled=compiled, state=state, batch=batch, times=[])
        runs[name].update(compile_s=compile_s, gflops=_flops(compiled) / 1e9)
    for r in range(ARGS.warmup + ARGS.repeats):
        for name in impls:
            run = runs[name]
            with run["setup"].context():
                t = time.perf_counter()
                run["state"], metrics = run["compiled"](run["state"], run["batch"])
                jax.block_until_ready(metrics)
                dt = time.perf_counter() - t
            if r == 0:
                run["first_loss"] = float(metrics["loss"])
            if r >= ARGS.warmup:
                run["times"].append(dt)
            print(f"[dense_step] round {r} {name}: {dt:.2f} s", flush=True)

    images = jnp.asarray(host["image"])
    for name in impls:
        run = runs[name]
        with implementation(name):
            part = parts(cfg, stage, images)
        med = statistics.median(run["times"])
        row = {
            "impl": name,
            "step_s_median": round(med, 3),
            "step_s_all": [round(t, 3) for t in run["times"]],
            "steps_per_s": round(1.0 / med, 3),
            "compile_s": round(run["compile_s"], 1),
            "step_gflops": round(run["gflops"], 2),
            "first_loss": run["first_loss"],
            "parts_ms": part,
        }
        result["rows"].append(row)
        print(f"[dense_step] {name}: {row['steps_per_s']} steps/s; parts {part}", flush=True)
    base = runs[impls[0]]
    result.update(
        what="dense tiny train step (fwd+bwd+AdamW), CPU f32",
        shape=dict(
            image_size=int(cfg.data.image_size),
            batch=int(cfg.data.batch_size),
            width=int(cfg.model.width),
            depth=int(cfg.model.depth),
            patch=int(cfg.model.patch),
            head_channels=int(cfg.model.head_channels),
        ),
        devices=jax.device_count(),
        cpu_affinity=sorted(os.sched_getaffinity(0)),
        load_avg_1m_at_end=round(os.getloadavg()[0], 2),
        steps_per_s={r["impl"]: r["steps_per_s"] for r in result["rows"]},
        speedup_vs_first={
            n: round(statistics.median(base["times"]) / statistics.median(runs[n]["times"]), 2)
            for n in impls
        },
        first_loss_max_abs_diff=max(abs(runs[n]["first_loss"] - base["first_loss"]) for n in impls),
        jax=jax.__version__,
    )
    if not ARGS.no_write:
        write_result(result, ARGS.out)


if __name__ == "__main__":
    main()
