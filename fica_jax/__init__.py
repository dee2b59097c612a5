"""fica-jax: FiCA (feed-forward Gaussian Codec Avatars from a single portrait) in JAX/Flax NNX."""

from flax import nnx as _nnx

# Parameters carry *logical* axis names; they are resolved to mesh axes by the rule tables in
# `fica_jax.sharding` at jit time, never eagerly at construction (which needs a mesh context).
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
