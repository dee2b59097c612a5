"""Differentiable 3D Gaussian rasteriser in pure JAX with gsplat's API (docs/architecture.md §7).

Stages: `project` (EWA projection) -> `tiles` (per-tile depth-sorted lists in a static slot
array, sized by a count pass) -> `composite` (front-to-back alpha blending over each tile's
whole list, with gsplat's backward as a custom VJP); `dense` is the all-pixels reference;
`surfels` renders UV texture + position maps as surface-aligned flat Gaussians (refiner, FiCA
Sec. 2.3); `ply` reads/writes the standard 3DGS .ply layout.
"""

from fica_jax.render.rasterize import RasterOptions, rasterization, render

__all__ = ["RasterOptions", "rasterization", "render"]
