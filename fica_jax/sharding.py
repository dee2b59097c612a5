"""Mesh construction, logical axis names and per-network sharding rules (MaxText style).

Parameters and activations are annotated with *logical* axis names (`EMBED`, `MLP`, ...). A rule
table, one per network and kept here as data, maps each logical name to mesh axes. Changing how a
2B model is laid out on a pod is a change to a table, never to model code.

Mesh axes:
  data   -- pure data parallelism (params replicated).
  fsdp   -- data parallelism whose devices also shard params/optimizer state (ZeRO-3 style).
  tensor -- Megatron-style tensor parallelism inside attention/MLP.
The batch is split over (data, fsdp).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fica_jax.errors import UserError

# Parameters carry logical axis names, resolved to mesh axes by the rule tables below at jit time,
# never eagerly at construction (which would need a mesh context). Set here, the module every
# sharded model and the train loop import, so it holds however a model is reached.
nnx.use_eager_sharding(False)

# ----------------------------------------------------------------------------- mesh axes
DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# ----------------------------------------------------------------------------- logical axes
BATCH = "batch"  # examples
LENGTH = "length"  # tokens / flattened pixels
EMBED = "embed"  # model width (residual stream)
MLP = "mlp"  # MLP hidden
HEADS = "heads"  # attention heads
HEAD_DIM = "head_dim"  # per-head features
QKV = "qkv"  # the fused q/k/v stack axis
LAYERS = "layers"  # stacked (scanned) blocks
CONV_IN = "conv_in"  # conv input channels
CONV_OUT = "conv_out"  # conv output channels
NORM = "norm"  # norm scales / biases and other small vectors
HEIGHT, WIDTH = "height", "width"  # image / UV-map activations
CHANNELS = "channels"  # activation channels

# ----------------------------------------------------------------------------- rule tables
# Each entry: logical name -> mesh axis, tuple of mesh axes, or None (replicated).
_ACTIVATIONS: tuple[tuple[str, Any], ...] = (
    (BATCH, (DATA, FSDP)),
    (LENGTH, None),
    (HEIGHT, None),
    (WIDTH, None),
    (CHANNELS, None),
    (LAYERS, None),
)

_TRANSFORMER: tuple[tuple[str, Any], ...] = (
    (EMBED, FSDP),
    (MLP, TENSOR),
    (HEADS, TENSOR),
    (HEAD_DIM, None),
    (QKV, None),
    (CONV_IN, None),
    (CONV_OUT, FSDP),
    (NORM, None),
)

_CONVNET: tuple[tuple[str, Any], ...] = (
    # Conv nets (VAE, UPM, refiner U-Net): shard output channels over fsdp, input channels over
    # tensor; the small width of these nets makes tensor parallelism of little use.
    (CONV_IN, TENSOR),
    (CONV_OUT, FSDP),
    (EMBED, FSDP),
    (MLP, TENSOR),
    (HEADS, TENSOR),
    (HEAD_DIM, None),
    (QKV, None),
    (NORM, None),
)

RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    "default": _TRANSFORMER + _ACTIVATIONS,
    "dit": _TRANSFORMER + _ACTIVATIONS,
    "clip": _TRANSFORMER + _ACTIVATIONS,
    "vit": _TRANSFORMER + _ACTIVATIONS,  # Sapiens backbone + dense heads
    "vae": _CONVNET + _ACTIVATIONS,
    "refiner": _CONVNET + _ACTIVATIONS,
    "upm": _CONVNET + _ACTIVATIONS,
}


def rules_for(network: str) -> tuple[tuple[str, Any], ...]:
    if network not in RULES:
        raise UserError(f"no sharding rules for network {network!r}; known: {sorted(RULES)}")
    return RULES[network]


# ----------------------------------------------------------------------------- mesh
def make_mesh(
    shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices.

    `shape` is e.g. `{"data": 2, "fsdp": -1}`; missing axes are 1. Axis types are Auto so that
    GSPMD propagates shardings (jax.make_mesh would otherwise default to Explicit).
    """
    shape = dict(shape or {FSDP: -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise UserError(f"mesh axes {sorted(unknown)} unknown; expected some of {MESH_AXES}")
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UserError(f"mesh {shape}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise UserError(f"mesh {shape}: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(
            f"mesh {shape} needs {math.prod(sizes)} devices but {len(devices)} are available"
        )
    types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        # A TPU torus whose physical axes do not factor into the logical ones (data=8 on a
        # 4x4x4 v5p slice): split physical axes, as MaxText's `create_device_mesh` allows.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)


# ----------------------------------------------------------------------------- specs
def logical_to_spec(names: Sequence[str | None], rules: Sequence[tuple[str, Any]]) -> P:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dims they do not divide (tiny configs on big meshes stay valid).

    The paper-scale layouts are pinned by golden-file tests, so this never silently changes them.
    """
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for a in axes_t:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def _var_names(v: nnx.Variable) -> tuple | None:
    return v.get_metadata().get("out_sharding")


def param_specs(state: nnx.State, rules: Sequence[tuple[str, Any]], mesh: Mesh | None = None):
    """PartitionSpec tree for an `nnx.State` whose Variables carry logical `out_sharding`."""

    def one(v):
        if not isinstance(v, nnx.Variable):
            return P()
        names = _var_names(v)
        spec = logical_to_spec(names, rules) if names else P()
        return fit_spec(spec, v.shape, mesh) if mesh is not None else spec

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]]):
    """NamedSharding tree matching `state` (an abstract or concrete `nnx.State`)."""
    specs = param_specs(state, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def unannotated_params(module_or_state) -> list[str]:
    """Paths of parameters without a logical sharding annotation (tests assert this is empty)."""
    state = module_or_state
    if isinstance(module_or_state, nnx.Module):
        state = nnx.state(module_or_state, nnx.Param)
    missing = []
    for path, v in nnx.to_flat_state(state):
        if isinstance(v, nnx.Param) and v.ndim > 0 and not _var_names(v):
            missing.append("/".join(map(str, path)))
    return missing


def sharded_init(init_fn, mesh: Mesh, rules: Sequence[tuple[str, Any]]):
    """Creates an NNX module directly sharded: abstract shapes -> shardings -> jitted init.

    `init_fn()` builds the module; it is traced once under `eval_shape` and then run under `jit`
    with `out_shardings`, so no device ever holds the full, unsharded parameters.
    """
    abstract = nnx.eval_shape(init_fn)
    graphdef, abs_state = nnx.split(abstract)
    shardings = param_shardings(abs_state, mesh, rules)

    def init():
        return nnx.split(init_fn())[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- activations
_current_rules: list[tuple[tuple[str, Any], ...]] = []


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Sets the rule table used by `constrain` (and by nnx's logical annotations) in a block."""
    _current_rules.append(tuple(rules))
    try:
        with nnx.logical_axis_rules(tuple(rules)):
            yield
    finally:
        _current_rules.pop()


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside a mesh or rule context."""
    mesh = jax.sharding.get_abstract_mesh()
    if not _current_rules or mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(names, _current_rules[-1])
    spec = fit_spec(spec, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def per_batch_shard(fn):
    """fn over arrays that share a leading batch dim, run on each device's share of the batch
    (`shard_map` over the mesh axes of the BATCH rule) when the batch is split: for ops XLA
    cannot partition, such as the renderer's Pallas kernels. fn must treat examples
    independently. Outside a mesh or rule context, or with an unsplit batch, fn itself."""

    def wrapped(*args):
        mesh = jax.sharding.get_abstract_mesh()
        if not _current_rules or mesh is None or mesh.empty:
            return fn(*args)
        b = next(x.shape[0] for x in jax.tree.leaves(args))
        spec = fit_spec(logical_to_spec((BATCH,), _current_rules[-1]), (b,), mesh)
        if spec[0] is None:
            return fn(*args)
        specs = jax.tree.map(lambda _: P(spec[0]), args)
        return jax.shard_map(fn, in_specs=specs, out_specs=P(spec[0]), check_vma=False)(*args)

    return wrapped


# ----------------------------------------------------------------------------- host batches
def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P((DATA, FSDP), *([None] * (ndim - 1))))


def put_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Puts this host's slice of a batch onto the mesh as global arrays split over (data, fsdp).

    Every leaf's leading dim is the per-host batch; the global batch is per-host x process_count.
    """

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, dict(batch))
