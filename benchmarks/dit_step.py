"""DiT train-step and sampling speed on CPU (f32): ours (JAX/NNX) vs diffusers' DiT (torch).

  python benchmarks/dit_step.py                  # defaults below; ~10 min on 2 busy cores
  python benchmarks/dit_step.py --quick          # fewer repeats, no B sampling
  python benchmarks/dit_step.py --xla-preset X   # an XLA CPU flag set from XLA_PRESETS

Prints JSON and writes benchmarks/results/dit_step_cpu.json (temp file, then rename). In one
process:

1. one AdamW train step (forward + backward + update, compiled once, timed after warm-up) of our
   DiT without ControlMLP (`control_channels=0`) and of diffusers' `DiTTransformer2DModel`
   (`torch.optim.AdamW`, `torch.set_num_threads` = the cores JAX uses) at identical widths,
   depth, heads, patch, channels, latent size, token count and batch; both take the same
   rectified-flow MSE loss on random latents (logit-normal times, `fica_jax.flow`). The two are
   timed in alternation (round r: ours, then diffusers) so background load hits both alike; the
   ratio is ours / diffusers (median step times, and the median of per-round ratios).
2. our full model (with ControlMLP) at the same shape.
3. 50-step Euler sampling with CFG for the `tiny` and `B` variants through the real sampler
   (`fica_jax.infer.sample.sample_latents` -> `fica_jax.flow.euler_sample`): one identity, both
   domains (texture + geometry rows) on the 32x32 latent (256 tokens), so 4 rows per call.

Issue target: ours / diffusers <= 0.8.

Parameter counts differ by construction: diffusers' `AdaLayerNormZero` holds a full
timestep + class-label embedder *inside every block* (the original DiT shares one), and its
label table has `num_embeds_ada_norm + 1` rows per block; ours has one shared conditioning path
(t-embedder, CLIP projection, domain embedding) plus per-head QK-norm scales and a patch
LayerNorm. The per-token (matmul) parameters of the blocks are identical; the JSON splits the
counts accordingly. Those embedders act on [B, D] vectors, so their FLOPs are negligible.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.dit_cpu_variant import _attn_call_variant, _mlp_call_variant  # noqa: E402
from benchmarks.results_io import write_result  # noqa: E402

# XLA CPU flag sets tried by `--xla-preset` (set here, before jax is imported; documented in
# the JSON). "default" leaves XLA_FLAGS as it is.
XLA_PRESETS = {
    "default": "",
    # YNNPACK / XNNPACK / oneDNN fusions for dots (XLA's experimental CPU library paths)
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "onednn": "--xla_cpu_use_onednn=true",
    "ynn_dot_onednn": "--xla_cpu_experimental_ynn_fusion_type=dot --xla_cpu_use_onednn=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    # changes f32 semantics (approximate exp/tanh, reassociation): an experiment, never a default
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


# Integer flags and defaults: the model shape (latent: its side, tokens = (side / patch)^2;
# num_embeds_ada_norm: diffusers' class count), then timing and sampling.
INT_ARGS = dict(width=384, depth=6, heads=6, patch=2, latent=32, channels=4, batch=8,
                image_emb_dim=768, control_channels=64, num_embeds_ada_norm=1000, warmup=2,
                repeats=7, sample_steps=50, sample_identities=1)  # fmt: skip


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for name, default in INT_ARGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--sample-variants", default="tiny,B")
    p.add_argument("--sample-repeats", default="tiny=3,B=1")
    p.add_argument("--cfg-scale", type=float, default=3.0, help="guidance (1: unguided)")
    p.add_argument(
        "--skip", default="", help="parts to skip: ours,diffusers,control,variant,sample"
    )
    p.add_argument(
        "--sweep-xla",
        action="store_true",
        help="also run ours vs diffusers once per XLA preset (one subprocess each)",
    )
    p.add_argument("--xla-preset", default="default", choices=sorted(XLA_PRESETS))
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for torch's OpenMP pool ('' leaves the environment alone). With "
        "libgomp's default active spin, torch on a shared, oversubscribed 2-core host runs 3-4x "
        "slower (barrier waits on preempted threads); PASSIVE gives diffusers its best time",
    )
    p.add_argument("--quick", action="store_true", help="repeats 3, warmup 1, tiny sampling only")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dit_step_cpu.json"))
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.repeats, a.warmup, a.sample_variants = 3, 1, "tiny"
    return a


ARGS = _args()
if flags := XLA_PRESETS[ARGS.xla_preset]:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if ARGS.omp_wait_policy:  # read by libgomp when torch loads it
    os.environ["OMP_WAIT_POLICY"] = ARGS.omp_wait_policy

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fica_jax import flow  # noqa: E402
from fica_jax.models import dit, layers  # noqa: E402

LR, B1, B2, EPS, WD = 1e-4, 0.9, 0.999, 1e-8, 0.01


def loadavg() -> float:
    return float(pathlib.Path("/proc/loadavg").read_text().split()[0])


def med(xs):
    return float(statistics.median(xs))


def rnd(x, n=4):
    return None if x is None else round(float(x), n)


# ----------------------------------------------------------------------------- ours
def ours_step(cfg: dit.DiTConfig, a, variant: bool = False):
    """(step(), n_params, compile_s, model, temp_bytes): one jitted AdamW step on fresh random
    latents each call. `variant`: trace with the CPU variant's Attention / Mlp forwards."""
    model = dit.DiT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = layers.num_params(model)
    tx = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    opt_state = tx.init(params)
    b, s, c = a.batch, a.latent, a.channels

    def loss_fn(params, rng):
        m = nnx.merge(graphdef, params)
        k = jax.random.split(rng, 5)
        x0 = jax.random.normal(k[0], (b, s, s, c))
        image_emb = jax.random.normal(k[1], (b, cfg.image_emb_dim))
        domain = jax.random.randint(k[2], (b,), 0, cfg.num_domains)
        drop = jax.random.bernoulli(k[3], 0.1, (b,))
        control = None
        if cfg.control_channels:
            control = jax.random.normal(k[4], (b, s, s, cfg.control_channels))

        def velocity(x_s, t, drop):
            return m(x_s, t, image_emb, domain, control, drop)

        return flow.flow_loss(velocity, x0, jax.random.fold_in(rng, 1), drop)[0]

    def step(params, opt_state, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    saved = layers.Attention.__call__, layers.Mlp.__call__
    if variant:
        layers.Attention.__call__, layers.Mlp.__call__ = _attn_call_variant, _mlp_call_variant
    try:
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, jax.random.key(0))
    finally:
        layers.Attention.__call__, layers.Mlp.__call__ = saved
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    state = {"params": params, "opt": opt_state, "i": 0}

    def run():
        state["i"] += 1
        p, o, loss = compiled(state["params"], state["opt"], jax.random.key(state["i"]))
        state["params"], state["opt"] = p, o
        jax.block_until_ready((p, o, loss))
        return float(loss)

    return run, n_params, compile_s, model, temp


def param_split_ours(model) -> dict[str, int]:
    state = nnx.state(model, nnx.Param)
    out = {
        "blocks_token_path": 0,
        "qk_norm": 0,
        "conditioning": 0,
        "patch_and_final": 0,
        "control": 0,
    }
    for path, v in jax.tree_util.tree_leaves_with_path(state):
        name, n = jax.tree_util.keystr(path), int(np.prod(v.shape))
        if "control" in name:
            out["control"] += n
        elif "q_norm" in name or "k_norm" in name:
            out["qk_norm"] += n
        elif "blocks" in name:
            out["blocks_token_path" if "'ada'" not in name else "conditioning"] += n
        elif any(k in name for k in ("t_embed", "image_proj", "image_null", "domain_embed")):
            out["conditioning"] += n
        elif "final" in name and "'ada'" in name:
            out["conditioning"] += n
        else:
            out["patch_and_final"] += n
    return out


# ----------------------------------------------------------------------------- diffusers
def diffusers_step(a, threads: int):
    import torch
    from diffusers import DiTTransformer2DModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=a.heads,
        attention_head_dim=a.width // a.heads,
        in_channels=a.channels,
        num_layers=a.depth,
        sample_size=a.latent,
        patch_size=a.patch,
        num_embeds_ada_norm=a.num_embeds_ada_norm,
    ).train()
    n_params = sum(p.numel() for p in model.parameters())
    split = {"blocks_token_path": 0, "conditioning": 0, "patch_and_final": 0}
    for name, p in model.named_parameters():
        if name.startswith("transformer_blocks"):
            split["conditioning" if ".norm1." in name else "blocks_token_path"] += p.numel()
        elif name.startswith("proj_out_1"):
            split["conditioning"] += p.numel()
        else:
            split["patch_and_final"] += p.numel()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    b, s, c = a.batch, a.latent, a.channels
    gen = torch.Generator().manual_seed(0)

    def run():
        x0 = torch.randn(b, c, s, s, generator=gen)
        eps = torch.randn(b, c, s, s, generator=gen)
        st = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal(0, 1), as flow_loss
        labels = torch.randint(0, a.num_embeds_ada_norm, (b,), generator=gen)
        x_s = (1 - st)[:, None, None, None] * x0 + st[:, None, None, None] * eps
        v = model(x_s, timestep=st * 1000.0, class_labels=labels).sample
        loss = torch.mean((v - (eps - x0)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    info = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "attn_processor": type(model.transformer_blocks[0].attn1.processor).__name__,
    }
    return run, n_params, split, info


# ----------------------------------------------------------------------------- sampling
def sample_time(name: str, a, repeats: int) -> dict:
    """The real sampler (`fica_jax.infer.sample.sample_latents`: both domains of every identity in one
    batch, 50 guided Euler steps) for `a.sample_identities` identities on FiCA's 32x32 latent
    grid (patch 2: 256 tokens); with CFG each network call sees 4 rows per identity. Compiled
    ahead of time (compile_s), then timed `repeats` times."""
    from fica_jax.infer import sample as sample_lib

    cfg = dit.VARIANTS[name]
    model = dit.DiT(cfg, rngs=nnx.Rngs(0))
    side, n_id = 32, a.sample_identities
    k = jax.random.split(jax.random.key(0), 3)
    control = jax.random.normal(k[0], (n_id, side, side, cfg.control_channels))
    image_emb = jax.random.normal(k[1], (n_id, cfg.image_emb_dim))
    graphdef, state = nnx.split(model)

    def run(state, control, image_emb, rng):
        m = nnx.merge(graphdef, state)
        kw = dict(steps=a.sample_steps, cfg_scale=a.cfg_scale, shift=1.0)
        return sample_lib.sample_latents(m, control, image_emb, rng, **kw)

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(state, control, image_emb, k[2]).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, control, image_emb, k[2]))
        times.append(time.perf_counter() - t0)
    rows = 2 * n_id * (2 if a.cfg_scale != 1.0 else 1)
    return {
        "params": layers.num_params(model),
        "width": cfg.width,
        "depth": cfg.depth,
        "heads": cfg.heads,
        "latent": [side, side, cfg.in_channels],
        "tokens": (side // cfg.patch) ** 2,
        "identities": n_id,
        "rows_per_call": rows,
        "steps": a.sample_steps,
        "cfg_scale": a.cfg_scale,
        "compile_s": rnd(compile_s, 2),
        "times_s": [rnd(t, 3) for t in times],
        "median_s": rnd(med(times), 3),
        "per_step_ms": rnd(1000 * med(times) / a.sample_steps, 2),
        "loadavg_1m": loadavg(),
    }


# ----------------------------------------------------------------------------- main
def time_interleaved(runs: dict, warmup: int, repeats: int):
    """Warm-up, then `repeats` rounds that run every entry once (alternating order).
    -> ({name: wall seconds}, {name: process CPU seconds}, [1-min load after each round])."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    loads = []
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]  # no fixed position in a round
        for k in order:
            c0, t0 = os.times(), time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
            c1 = os.times()
            cpu[k].append(c1.user + c1.system - c0.user - c0.system)
        loads.append(loadavg())
    return times, cpu, loads


def _sweep_xla(a) -> dict:
    """ours vs diffusers once per non-default XLA preset, each in its own process (XLA flags are
    read when jax starts). Fewer repeats than the main run: a coarse screen, noisy on a busy host."""
    import subprocess

    out = {}
    for name, flags in XLA_PRESETS.items():
        if name == "default":
            continue
        cmd = [
            sys.executable,
            __file__,
            "--xla-preset",
            name,
            "--skip",
            "control,variant,sample",
            "--no-write",
            "--repeats",
            str(max(3, a.repeats // 2)),
            "--warmup",
            "1",
        ]
        for k in ("width", "depth", "heads", "patch", "latent", "channels", "batch"):
            cmd += [f"--{k}", str(getattr(a, k))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            out[name] = {"flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}
            continue
        r = json.loads(proc.stdout)
        out[name] = {
            "flags": flags,
            "ours_step_median_s": r["ours"]["step_median_s"],
            "diffusers_step_median_s": r["diffusers"]["step_median_s"],
            "ratio_ours_over_diffusers": r["ratio_ours_over_diffusers"],
            "ratio_per_round_median": r["ratio_per_round_median"],
            "loadavg_1m_during_steps": r["loadavg_1m_during_steps"],
        }
        print(json.dumps({name: out[name]}), file=sys.stderr)
    return out


def main() -> None:
    a = ARGS
    skip = set(filter(None, a.skip.split(",")))
    threads = len(os.sched_getaffinity(0))
    base = dit.DiTConfig(
        width=a.width,
        depth=a.depth,
        heads=a.heads,
        patch=a.patch,
        in_channels=a.channels,
        image_emb_dim=a.image_emb_dim,
        control_channels=0,
    )
    result = {
        "benchmark": "benchmarks/dit_step.py",
        "command": " ".join(["python", "benchmarks/dit_step.py", *sys.argv[1:]]),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "cpu_cores_available": threads,
        "xla_preset": a.xla_preset,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "dtype": "float32",
        "loadavg_1m_start": loadavg(),
        "shape": {
            "width": a.width,
            "depth": a.depth,
            "heads": a.heads,
            "patch": a.patch,
            "latent": [a.latent, a.latent, a.channels],
            "tokens": (a.latent // a.patch) ** 2,
            "batch": a.batch,
        },
        "loss": "rectified-flow MSE, logit-normal(0, 1) times, random latents",
        "optimizer": {"name": "AdamW", "lr": LR, "b1": B1, "b2": B2, "eps": EPS, "wd": WD},
        "warmup": a.warmup,
        "repeats": a.repeats,
        "timing": "interleaved rounds; wall medians; cpu_s = process user+sys per step",
    }
    runs = {}
    if "ours" not in skip:
        run, n, compile_s, model, temp = ours_step(base, a)
        result["ours"] = {
            "params": n,
            "params_split": param_split_ours(model),
            "qk_norm": base.qk_norm,
            "compile_s": rnd(compile_s, 2),
            "xla_temp_mb": rnd(temp / 1e6, 1) if temp else None,
        }
        runs["ours"] = run
    if "diffusers" not in skip:
        run, n, split, info = diffusers_step(a, threads)
        result["diffusers"] = {
            "params": n,
            "params_split": split,
            "num_embeds_ada_norm": a.num_embeds_ada_norm,
            **info,
        }
        runs["diffusers"] = run
    if "variant" not in skip and "ours" not in skip:
        run, n, compile_s, _, temp = ours_step(base, a, variant=True)
        result["ours_cpu_variant"] = {
            "what": "ours with the benchmark's CPU variant of the Attention / Mlp forwards "
            "(custom-VJP kernel gradient as one flat matmul, MLP activation rematerialised); "
            "not the library's code, see the comment above _matmul",
            "compile_s": rnd(compile_s, 2),
            "xla_temp_mb": rnd(temp / 1e6, 1) if temp else None,
        }
        runs["ours_cpu_variant"] = run
    if "control" not in skip:
        cfg = dit.DiTConfig(**{**base.__dict__, "control_channels": a.control_channels})
        run, n, compile_s, _, temp = ours_step(cfg, a)
        result["ours_with_control"] = {
            "params": n,
            "control_channels": a.control_channels,
            "compile_s": rnd(compile_s, 2),
            "xla_temp_mb": rnd(temp / 1e6, 1) if temp else None,
        }
        runs["ours_with_control"] = run
    if runs:
        times, cpu, loads = time_interleaved(runs, a.warmup, a.repeats)
        result["loadavg_1m_during_steps"] = loads
        for k, ts in times.items():
            result[k]["step_times_s"] = [rnd(t) for t in ts]
            result[k]["step_median_s"] = rnd(med(ts))
            result[k]["cpu_s_median"] = rnd(med(cpu[k]))
        if "ours" in times and "diffusers" in times:
            per_round = [o / d for o, d in zip(times["ours"], times["diffusers"], strict=True)]
            result["ratio_ours_over_diffusers"] = rnd(
                med(times["ours"]) / med(times["diffusers"]), 3
            )
            result["ratio_per_round_median"] = rnd(med(per_round), 3)
            result["ratio_cpu_s"] = rnd(med(cpu["ours"]) / med(cpu["diffusers"]), 3)
            if "ours_cpu_variant" in times:
                var = times["ours_cpu_variant"]
                result["ratio_cpu_variant"] = rnd(med(var) / med(times["diffusers"]), 3)
                result["ratio_cpu_variant_per_round_median"] = rnd(
                    med([o / d for o, d in zip(var, times["diffusers"], strict=True)]), 3
                )
            result["params_ratio_ours_over_diffusers"] = rnd(
                result["ours"]["params"] / result["diffusers"]["params"], 3
            )
            result["target_ratio"] = 0.8
            result["target_met"] = result["ratio_ours_over_diffusers"] <= 0.8
        if "ours_with_control" in times and "ours" in times:
            result["ratio_control_over_plain"] = rnd(
                med(times["ours_with_control"]) / med(times["ours"]), 3
            )
    if "sample" not in skip:
        reps = dict(kv.split("=") for kv in a.sample_repeats.split(","))
        result["sampling"] = {}
        for name in filter(None, a.sample_variants.split(",")):
            result["sampling"][name] = sample_time(name, a, int(reps.get(name, 1)))
    if a.sweep_xla:
        result["xla_sweep"] = _sweep_xla(a)
    result["loadavg_1m_end"] = loadavg()
    print(json.dumps(result, indent=2))
    if not a.no_write:
        write_result(result, a.out, indent=2)


if __name__ == "__main__":
    main()
