"""`fica export`: a training run's checkpoint -> `model.safetensors` + `model.json`, any mesh.

The run's Orbax checkpoint may have been written by any mesh (a pod's `fsdp x tensor` layout or
the 8 fake CPU devices of the tests). Export needs none of it: the model is built abstractly
(`nnx.eval_shape`, no parameter memory), and the parameters are read back to host numpy arrays
in groups of at most `chunk_bytes` and streamed into the safetensors file one tensor at a time,
so host RAM stays near one group, never twice the model.

The folder written (temp folder, then renamed):
- `model.safetensors`: every parameter under its dotted NNX path (`blocks.0.attn.qkv.kernel`),
  f32 or bf16, in JAX layout (conv kernels HWIO, NHWC activations); plus the stage's data
  normalisation arrays under `stats.*` (e.g. the VAE's per-texel position reference map).
- `model.json`: format/version, stage, variant, the model architecture (its config dataclass),
  stored and compute dtypes, fica-jax version, source run/step/EMA, the data normalisation stats,
  the tensor list, and the whole run config (so `load_exported` rebuilds the model).

`load_exported(dir)` rebuilds the JAX model from that folder alone; an f32 export reloads
bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from fica_jax import __version__
from fica_jax.errors import UserError
from fica_jax.export.manifest import read_arrays, read_manifest
from fica_jax.files import atomic_dir, check_writable, write_json
from fica_jax.geometry import template_store

FORMAT, VERSION = "fica-export", 1
DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", None)}
_ST_CODES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "BF16": None}


# ----------------------------------------------------------------------------- safetensors
def _np_dtype(code: str):
    if code == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_ST_CODES[code])


def write_safetensors(
    path: pathlib.Path,
    specs: list[tuple[str, tuple[int, ...], str]],  # (name, shape, dtype code) in file order
    tensors: Iterator[tuple[str, np.ndarray]],  # the same names, same order, produced lazily
    metadata: dict[str, str] | None = None,
) -> None:
    """Streams tensors into a safetensors file: the header is written from `specs` first, then
    each array as it arrives, so only one is ever held here."""
    header, offset = {}, 0
    for name, shape, code in specs:
        n = int(np.prod(shape, dtype=np.int64)) * _np_dtype(code).itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data on 8 bytes
    want = {name: (tuple(shape), code) for name, shape, code in specs}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, arr), (spec_name, *_) in zip(tensors, specs, strict=True):
            shape, code = want[name]
            if name != spec_name or tuple(arr.shape) != shape:
                raise ValueError(f"tensor {name} {arr.shape} does not match its header entry")
            f.write(np.ascontiguousarray(arr, _np_dtype(code)).tobytes())


# ----------------------------------------------------------------------------- params
def param_names(abstract_pure: dict) -> list[tuple[str, tuple, Any]]:
    """[(dotted name, key path, leaf)] of an NNX pure param dict, in a fixed order."""
    import jax

    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_pure)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        out.append((".".join(str(k) for k in keys), keys, leaf))
    return out


def _nest(items: list[tuple[tuple, Any]]) -> dict:
    tree: dict = {}
    for keys, value in items:
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return tree


def _get(tree: dict, keys: tuple):
    for k in keys:
        tree = tree[k]
    return tree


def _groups(entries, chunk_bytes: int):
    group, size = [], 0
    for e in entries:
        n = int(np.prod(e[2].shape, dtype=np.int64)) * np.dtype(e[2].dtype).itemsize
        if group and size + n > chunk_bytes:
            yield group
            group, size = [], 0
        group.append(e)
        size += n
    if group:
        yield group


def _checkpoint_reader(run: pathlib.Path, step: int | None) -> tuple[Any, int]:
    from fica_jax.train.checkpoint import read_only_manager

    root = run.absolute() / "checkpoints"
    if not root.is_dir():
        raise UserError(
            f"--run {run}: no checkpoints/ folder; expected a `fica train` run directory"
        )
    manager = read_only_manager(root)
    steps = sorted(manager.all_steps())
    if not steps:
        raise UserError(f"--run {run}: no complete checkpoint in {root}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"--step {step}: {root} holds steps {steps}")
    return manager, step


def host_params(
    run: pathlib.Path, abstract_pure: dict, step: int | None, item: str, chunk_bytes: int
) -> tuple[int, Callable[[], Iterator[tuple[str, np.ndarray]]]]:
    """(step, generator of (name, host array)) restoring at most `chunk_bytes` at a time."""
    import orbax.checkpoint as ocp

    from fica_jax.train.checkpoint import restore_item

    manager, step = _checkpoint_reader(run, step)
    entries = param_names(abstract_pure)

    def generate():
        try:
            for group in _groups(entries, chunk_bytes):
                item_tree = _nest([(keys, leaf) for _, keys, leaf in group])
                args = _nest(
                    [(keys, ocp.RestoreArgs(restore_type=np.ndarray)) for _, keys, _ in group]
                )
                try:
                    tree = restore_item(manager, step, item, item_tree, args)
                except (ValueError, KeyError, FileNotFoundError) as e:
                    raise UserError(
                        f"--run {run}: step {step} holds no {item!r} matching this model ({e})"
                    ) from None
                for name, keys, leaf in group:
                    arr = np.asarray(_get(tree, keys))
                    if arr.shape != tuple(leaf.shape):
                        raise UserError(
                            f"--run {run}: {name} is {arr.shape} in the checkpoint, the config builds {tuple(leaf.shape)}"
                        )
                    yield name, arr
        finally:
            manager.close()

    return step, generate


# ----------------------------------------------------------------------------- export
def _architecture(model) -> dict:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if cfg is not None and dataclasses.is_dataclass(cfg):
        return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return {}


def export_run(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    ema: bool = False,
    dtype: str = "float32",
    chunk_bytes: int = 256 << 20,
) -> dict:
    """Writes `out/model.safetensors` + `out/model.json`; returns the JSON."""
    from flax import nnx

    from fica_jax.train.checkpoint import load_run_config
    from fica_jax.train.stage import get_stage

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {sorted(DTYPES)}")
    run, out = pathlib.Path(run), check_writable(out)
    cfg = load_run_config(run)
    stage = get_stage(cfg.stage)
    model = nnx.eval_shape(lambda: stage.make_model(cfg, nnx.Rngs(0)))
    abstract = nnx.state(model, nnx.Param).to_pure_dict()
    use_ema = bool(ema)
    if use_ema and float(cfg.optim.get("ema_decay", 0.0)) <= 0:
        raise UserError(f"--ema: {run} keeps no EMA (its optim.ema_decay is 0)")
    step, params = host_params(run, abstract, step, "ema" if use_ema else "params", chunk_bytes)
    stats_json, stats_arrays = stage.export_stats(cfg) if stage.export_stats else ({}, {})

    code = DTYPES[dtype][0]
    entries = param_names(abstract)
    specs = [(n, tuple(leaf.shape), code if np.issubdtype(leaf.dtype, np.floating) else "I32")
             for n, _, leaf in entries]  # fmt: skip
    specs += [(k, tuple(v.shape), "F32") for k, v in stats_arrays.items()]

    def tensors():
        yield from params()
        yield from stats_arrays.items()

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "fica_jax_version": __version__,
        "stage": str(cfg.stage),
        "variant": str(cfg.model.get("variant", "")),
        "architecture": _architecture(model),
        "dtypes": {
            "stored": dtype,
            "compute": str(cfg.train.compute_dtype),
            "param": str(cfg.train.get("param_dtype", "float32")),
        },  # fmt: skip
        "source": {"run": str(run.absolute()), "step": int(step), "ema": use_ema},
        "stats": stats_json,
        "parameters": int(sum(np.prod(s) for _, s, _ in specs[: len(entries)])),
        "tensors": [n for n, _, _ in specs],
        "run_config": cfg.to_dict(),
    }
    with atomic_dir(out) as tmp:
        write_safetensors(tmp / "model.safetensors", specs, tensors(), {"format": FORMAT})
        write_json(tmp / "model.json", meta, default=str)
    return meta


# ----------------------------------------------------------------------------- reload
def read_export(directory: str | os.PathLike, stage: str | None = None) -> tuple[dict, dict]:
    """(model.json, {name: np.ndarray}) of an export folder, checked."""
    d, meta = read_manifest(directory, "model.json", FORMAT, VERSION, "`fica export`")
    if stage is not None and meta.get("stage") != stage:
        raise UserError(f"{d}: an export of stage {meta.get('stage')!r}, expected {stage!r}")
    return meta, read_arrays(d / "model.safetensors")


def load_exported(directory: str | os.PathLike, stage: str | None = None):
    """-> (run config, JAX model with the exported params, stats arrays {name: array})."""
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from fica_jax.train.stage import get_stage

    meta, arrays = read_export(directory, stage)
    cfg = ml_collections.ConfigDict(meta["run_config"])
    stats = {k[len("stats.") :]: v for k, v in arrays.items() if k.startswith("stats.")}
    # the head template it carries: its config names it by key (the UPM's eye texels)
    template_store.register_export(meta.get("stats", {}), stats, f"{directory}/model.safetensors")
    model = nnx.eval_shape(lambda: get_stage(cfg.stage).make_model(cfg, nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    entries = param_names(state.to_pure_dict())
    missing = [n for n, _, _ in entries if n not in arrays]
    if missing:
        raise UserError(
            f"{directory}/model.safetensors lacks {len(missing)} params, e.g. {missing[0]}"
        )
    values = [jnp.asarray(arrays[n]).astype(leaf.dtype) for n, _, leaf in entries]
    pure = _nest([(keys, v) for (_, keys, _), v in zip(entries, values, strict=True)])
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return cfg, model, stats, meta
