"""UV-space maps of a mesh: rasterization, position/normal maps, Laplacian and sampling.

FiCA represents an avatar as UV texture + geometry maps (Sec. 2.2: diffusion targets; Sec. 2.3:
the refiner regularises texture, Laplacian and normal maps; Sec. 2.4: the UPM places one
Gaussian per texel on the position map). Conventions: UVs in [0, 1], u right, v down (row =
v * R); texel (i, j) has its centre at ((j + 0.5) / R, (i + 0.5) / R).

Which triangle covers which texel depends only on the UV layout, so `uv_raster` computes it once
(concrete, outside jit) and `UVRaster.interpolate` turns any per-vertex quantity into a map; that
step is a linear, differentiable function of the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.geometry import raster


@dataclass(frozen=True, eq=False)
class UVRaster:
    """Texel-to-surface lookup for one UV layout at resolution R."""

    face_id: np.ndarray  # [R, R] int32, -1 where no chart
    bary: np.ndarray  # [R, R, 3] float32
    faces: np.ndarray  # [F, 3] int32

    @property
    def mask(self) -> np.ndarray:  # [R, R] bool
        return self.face_id >= 0

    @property
    def resolution(self) -> int:
        return self.face_id.shape[0]

    def interpolate(self, values: jax.Array) -> jax.Array:
        """Per-vertex values [V, C] -> UV map [R, R, C] (zero outside the atlas)."""
        return raster.interpolate(
            jnp.asarray(self.face_id), jnp.asarray(self.bary), jnp.asarray(self.faces), values
        )


def uv_raster(uvs: np.ndarray, faces: np.ndarray, resolution: int) -> UVRaster:
    """Rasterizes the UV layout uvs [V, 2] / faces [F, 3] into an R x R texel lookup."""
    uvs = np.asarray(uvs, np.float32)
    faces = np.asarray(faces, np.int32)
    xy = uvs[faces] * resolution  # [F, 3, 2] texel coordinates
    valid = np.ones(len(faces), bool)
    by, bx = raster.bbox_size(xy, valid, resolution, resolution)
    face_id, bary, _ = raster.rasterize(
        jnp.asarray(xy),
        jnp.ones(faces.shape, jnp.float32),
        jnp.asarray(valid),
        height=resolution,
        width=resolution,
        by=by,
        bx=bx,
    )
    return UVRaster(np.asarray(face_id), np.asarray(bary, np.float32), faces)


def uv_rasterize(
    uvs: np.ndarray,  # [V, 2]
    faces: np.ndarray,  # [F, 3]
    values: jax.Array,  # [V, C]
    resolution: int,
) -> tuple[jax.Array, np.ndarray]:
    """Barycentric rasterization of per-vertex values into UV: (map [R, R, C], mask [R, R])."""
    r = uv_raster(uvs, faces, resolution)
    return r.interpolate(jnp.asarray(values)), r.mask


def vertex_normals(
    verts: jax.Array,  # [V, 3]
    faces: jax.Array,  # [F, 3]
    weld: jax.Array | None = None,  # [V] int, id of the 3D position each vertex copies
) -> jax.Array:
    """Area-weighted unit vertex normals [V, 3].

    Vertices split at UV seams share a position; `weld` sums their face normals together so both
    copies get the normal of the whole surface instead of one side's fan.
    """
    faces = jnp.asarray(faces)
    tri = verts[faces]  # [F, 3, 3]
    fn = jnp.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    idx = faces if weld is None else jnp.asarray(weld)[faces]
    acc = jnp.zeros_like(verts).at[idx.reshape(-1)].add(jnp.repeat(fn, 3, axis=0))
    if weld is not None:
        acc = acc[jnp.asarray(weld)]
    norm = jnp.linalg.norm(acc, axis=-1, keepdims=True)
    return acc / jnp.maximum(norm, 1e-12)


def position_map(r: UVRaster, verts: jax.Array) -> jax.Array:
    """Geometry (position) map [R, R, 3] of a (posed) mesh in its own coordinates."""
    return r.interpolate(verts)


def normal_map(r: UVRaster, verts: jax.Array, weld: jax.Array | None = None) -> jax.Array:
    """Unit normal map [R, R, 3] (zero outside the atlas) of the mesh with vertices verts."""
    n = r.interpolate(vertex_normals(verts, r.faces, weld))
    norm = jnp.linalg.norm(n, axis=-1, keepdims=True)
    return jnp.where(norm > 1e-8, n / jnp.maximum(norm, 1e-8), 0.0)


def uv_laplacian(uv_map: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked 4-neighbour Laplacian of uv_map [R, R, C]; only in-atlas neighbours count.

    Neighbours outside `mask` [R, R] are ignored (not treated as zero) so chart borders do not
    produce a spurious edge response; texels outside the mask get 0.
    """
    m = mask.astype(uv_map.dtype)[..., None]
    pad_x = jnp.pad(uv_map * m, ((1, 1), (1, 1), (0, 0)))
    pad_m = jnp.pad(m, ((1, 1), (1, 1), (0, 0)))
    total = jnp.zeros_like(uv_map)
    count = jnp.zeros_like(m)
    for di, dj in ((0, 1), (2, 1), (1, 0), (1, 2)):
        total = total + pad_x[di : di + uv_map.shape[0], dj : dj + uv_map.shape[1]]
        count = count + pad_m[di : di + uv_map.shape[0], dj : dj + uv_map.shape[1]]
    return (total - count * uv_map) * m


def sample_uv_map(uv_map: jax.Array, uv: jax.Array) -> jax.Array:
    """Bilinear lookup of uv_map [R, R, C] at uv [..., 2] in [0, 1] -> [..., C] (edge clamp)."""
    res_y, res_x = uv_map.shape[:2]
    x = uv[..., 0] * res_x - 0.5
    y = uv[..., 1] * res_y - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]

    def at(yy, xx):
        yy = jnp.clip(yy, 0, res_y - 1).astype(jnp.int32)
        xx = jnp.clip(xx, 0, res_x - 1).astype(jnp.int32)
        return uv_map[yy, xx]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bot = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bot * fy


def dilate(uv_map: np.ndarray, mask: np.ndarray, steps: int = 4) -> np.ndarray:
    """Grows a UV map [R, R, C] `steps` texels past its mask (mean of valid neighbours).

    Bilinear sampling near a chart border reads texels outside the chart; padding them with the
    border colour stops the background from bleeding into renders.
    """
    out = np.array(uv_map, np.float32)
    m = np.array(mask, bool)
    for _ in range(steps):
        acc = np.zeros_like(out)
        cnt = np.zeros(m.shape, np.float32)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)):
            sm = np.roll(m, (dy, dx), (0, 1))
            acc += np.roll(out, (dy, dx), (0, 1)) * sm[..., None]
            cnt += sm
        grow = (~m) & (cnt > 0)
        out[grow] = acc[grow] / cnt[grow][:, None]
        m = m | grow
    return out


def normalized_convolution(
    x: np.ndarray, weight: np.ndarray, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian normalised convolution (Knutsson & Westin, 1993) of a map x [R, R, C] whose
    texels carry confidences weight [R, R] in [0, 1] -> (the weighted local mean [R, R, C], the
    local density of weight [R, R]). Texels with no weighted texel within the filter's reach
    (4 sigma) get density exactly 0 and mean 0; texels of weight 0 never leak in."""
    from scipy.ndimage import gaussian_filter

    w = np.asarray(weight, np.float32)
    num = gaussian_filter(np.asarray(x, np.float32) * w[..., None], (sigma, sigma, 0),
                          mode="nearest")  # fmt: skip
    den = gaussian_filter(w, sigma, mode="nearest")
    den = np.where(den > 1e-6, den, 0.0).astype(np.float32)
    return np.where(den[..., None] > 0, num / np.maximum(den, 1e-6)[..., None], 0.0), den
