"""NNX models. Parameters carry *logical* axis names; they are resolved to mesh axes by the rule
tables in `fica_jax.sharding` at jit time, never eagerly at construction (the setting lives in
`fica_jax.sharding`, imported here so it holds for every model however it is imported)."""

import fica_jax.sharding  # noqa: F401
