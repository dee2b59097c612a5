"""NNX models. Parameters carry *logical* axis names; they are resolved to mesh axes by the rule
tables in `fica_jax.sharding` at jit time, never eagerly at construction (which needs a mesh
context). Set here, so it holds for every model however it is imported."""

from flax import nnx as _nnx

_nnx.use_eager_sharding(False)
