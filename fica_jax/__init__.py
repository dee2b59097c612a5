"""fica-jax: FiCA (feed-forward Gaussian Codec Avatars from a single portrait) in JAX/Flax NNX.

Importing the package imports no framework: `fica_jax.export.torch_runtime` runs avatars with
PyTorch alone. The NNX setting every model relies on lives in `fica_jax.models`.
"""

__version__ = "0.1.0"
