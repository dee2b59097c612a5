"""A linear expression space fitted to tracked meshes (PCA of UV position deltas from neutral).

Public multi-view captures (Ava-256, Goliath, Multiface) ship per-frame tracked meshes but no
expression codes; RGCA and the Ava-256 decoders learn their expression space from those meshes.
The baseline here is linear: over the training identities' frames, the UV position map of each
frame minus its identity's neutral map, restricted to the atlas, is one row of X [T, M]. Its
uncentred SVD X = U S W^T (the neutral face is the origin: code 0 = neutral) gives the UV basis
W_k and each frame's code c = x W (orthonormal, so projection is reconstruction's least squares).

The same basis on the template's vertices keeps `template.pose_vertices` and the UV maps in step:
W_k = X^T U_k / S_k is a combination of the frames, and the UV map is linear in the vertices,
so B_k = D^T U_k / S_k with D [T, 3P] the same frames' vertex deltas rasterises exactly to W_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from fica_jax.errors import UserError
from fica_jax.geometry.template import HeadTemplate
from fica_jax.geometry.uvmaps import position_map, uv_raster


@dataclass(frozen=True)
class ExpressionBasis:
    uv: np.ndarray  # [E, R, R, 3] orthonormal over the atlas texels (m per unit code)
    vertices: np.ndarray  # [E, V, 3] the same directions on the template's vertices
    singular_values: np.ndarray  # [E]
    explained: np.ndarray  # [E] cumulative share of the training deltas' energy

    @property
    def dims(self) -> int:
        return len(self.uv)


def fit_basis(
    uv_deltas: np.ndarray,  # [T, R, R, 3] frame UV position maps minus neutral, metres
    vertex_deltas: np.ndarray,  # [T, V, 3] the same frames on the template's vertices
    mask: np.ndarray,  # [R, R] atlas texels
    dims: int,
) -> ExpressionBasis:
    """The first `dims` principal directions of the deltas (module docstring); fewer when the
    frames span fewer."""
    t = len(uv_deltas)
    if t == 0 or t != len(vertex_deltas):
        raise UserError(f"expression PCA: {t} UV and {len(vertex_deltas)} vertex deltas; need "
                        "the same non-zero number of training frames")  # fmt: skip
    m = mask > 0
    x = np.asarray(uv_deltas, np.float64)[:, m].reshape(t, -1)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    keep = int(min(dims, np.sum(s > s[0] * 1e-6))) if s.size and s[0] > 0 else 0
    u, s_all, s = u[:, :keep], s, s[:keep]
    coef = u / s  # [T, E]: W = X^T coef, B = D^T coef
    uv = np.einsum("te,t...->e...", coef, np.asarray(uv_deltas, np.float64) * m[..., None])
    verts = np.einsum("te,t...->e...", coef, np.asarray(vertex_deltas, np.float64))
    energy = np.cumsum(s_all**2) / max(float(np.sum(s_all**2)), 1e-30)
    return ExpressionBasis(uv.astype(np.float32), verts.astype(np.float32),
                           s.astype(np.float32), energy[:keep].astype(np.float32))  # fmt: skip


def project(uv_deltas: np.ndarray, basis_uv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Codes [T, E] of UV deltas [T, R, R, 3] on an orthonormal UV basis [E, R, R, 3]."""
    m = (mask > 0)[..., None]
    d = (np.asarray(uv_deltas, np.float64) * m).reshape(len(uv_deltas), -1)
    return (d @ np.asarray(basis_uv, np.float64).reshape(len(basis_uv), -1).T).astype(np.float32)


def reconstruction_rmse(uv_deltas: np.ndarray, basis_uv: np.ndarray, mask: np.ndarray) -> dict:
    """Per-texel position RMSE (mm) of frames [T, R, R, 3] given as deltas from neutral: left at
    the neutral (the delta itself) and rebuilt from their codes on the basis."""
    m = (mask > 0)[..., None]
    d = np.asarray(uv_deltas, np.float64) * m
    rec = np.einsum("te,e...->t...", project(d, basis_uv, mask), np.asarray(basis_uv, np.float64))
    n = max(int(m.sum()) * len(d), 1)
    rmse = lambda r: float(np.sqrt(np.sum(np.sum(r**2, -1)) / n) * 1e3)
    return {"neutral_mm": rmse(d), "pca_mm": rmse(d - rec * m), "frames": len(d)}


def mesh_codes(
    template: HeadTemplate,
    meshes: np.ndarray,  # [T, P, 3] vertex positions in the template's topology (OBJ order)
    neutral: np.ndarray,  # [P, 3] the same identity's neutral mesh
    resolution: int = 64,
) -> np.ndarray:
    """Codes [T, E] of a tracked mesh sequence on the template's expression basis: each frame's
    delta from `neutral`, rasterised into UV, least-squares fitted by the basis's UV maps (its
    projection when the basis is `fit_basis`' orthonormal one)."""
    n_pos = int(template.weld.max()) + 1
    if meshes.ndim != 3 or meshes.shape[1:] != (n_pos, 3) or neutral.shape != (n_pos, 3):
        raise UserError(f"meshes {list(meshes.shape)} / neutral {list(neutral.shape)}: the "
                        f"template {template.name!r} has {n_pos} vertices")  # fmt: skip
    if template.n_expr == 0:
        raise UserError(f"template {template.name!r} has no expression basis to fit codes on")
    r = uv_raster(template.uvs, template.faces, resolution)
    uv_map = lambda v: np.asarray(position_map(r, jnp.asarray(v, jnp.float32)), np.float64)
    basis = np.stack([uv_map(b) for b in template.expr_basis])  # [E, R, R, 3]
    deltas = np.stack([uv_map((m - neutral)[template.weld]) for m in meshes])
    m = np.asarray(r.mask) > 0
    a = basis[:, m].reshape(len(basis), -1).T  # [M, E]
    b = deltas[:, m].reshape(len(deltas), -1).T  # [M, T]
    return np.linalg.lstsq(a, b, rcond=None)[0].T.astype(np.float32)
