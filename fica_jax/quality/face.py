"""Face alignment for ArcFace and the face-region mask of the metrics (docs/evaluation.md).

Alignment (insightface `python-package/insightface/utils/face_align.py` `norm_crop`): five image
points -> least-squares similarity transform onto `ARCFACE_TEMPLATE` (Umeyama 1991, as
skimage `SimilarityTransform.estimate`) -> bilinear warp to a 112 x 112 crop, zero outside the
image (`cv2.warpAffine(..., borderValue=0)`). The five points come from iBUG-68 landmarks: eye
centres = mean of 36-41 and 42-47, nose tip 30, mouth corners 48 and 54. insightface works in
*index* coordinates (pixel centres at integers); our landmarks and cameras put pixel centres at
+0.5 (`data_pipelines/schema.py`), so points are shifted by -0.5 before the estimate.

Face region: the template vertices inside the outline of the 68 landmarks (jaw 0-16, then the
brows 26..17) seen from the front (orthographic along the head's +z) and, for skin, in front of
the outline's deepest landmark: the back of the head, the ears, the neck and the forehead above
the brows are out; the eyeballs and the mouth interior inside the outline are in, however deep. A face (triangle)
is in the region when its three corners are. Per frame the whole posed mesh is rasterised
(`geometry.raster`) and a pixel is face when its front-most triangle is, so the nose occludes
the cheek behind it as in the image.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.geometry import capture, raster
from fica_jax.geometry.procedural import PART_SKIN
from fica_jax.geometry.template import HeadTemplate, pose_vertices

# insightface `arcface_dst`: left eye, right eye (as seen in the image), nose tip, left and
# right mouth corners, index coordinates of the 112 x 112 crop
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]]
)  # fmt: skip
CROP = 112
# iBUG-68 indices averaged into each of the five points (36-41 is the subject's right eye,
# which appears on the image's left like the template's first point)
FIVE_FROM_68 = (tuple(range(36, 42)), tuple(range(42, 48)), (30,), (48,), (54,))
OUTLINE_68 = tuple(range(17)) + tuple(range(26, 16, -1))  # jaw, then brows right to left


# ----------------------------------------------------------------------------- alignment
def five_points(kpts: np.ndarray) -> np.ndarray:
    """iBUG-68 landmarks [..., 68, 2] -> the five ArcFace points [..., 5, 2]."""
    kpts = np.asarray(kpts, np.float64)
    return np.stack([kpts[..., list(ids), :].mean(-2) for ids in FIVE_FROM_68], -2)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[3, 3] least-squares similarity (rotation, uniform scale, translation) taking src [N, 2]
    onto dst [N, 2]: Umeyama's closed form with scale, as skimage's `_umeyama`."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n, d = src.shape
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, t = src - mu_s, dst - mu_d
    a = t.T @ s / n
    sign = np.ones(d)
    if np.linalg.det(a) < 0:
        sign[-1] = -1
    u, sv, vt = np.linalg.svd(a)
    rank = int(np.count_nonzero(sv > sv.max() * d * np.finfo(float).eps))
    if rank == 0:
        return np.full((d + 1, d + 1), np.nan)
    rot = sign.copy()
    if rank == d - 1:  # degenerate (collinear points): pick the proper rotation
        rot[-1] = 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0
    m = np.eye(d + 1)
    m[:d, :d] = u @ np.diag(rot) @ vt
    scale = (sv @ sign) / s.var(0).sum()
    m[:d, d] = mu_d - scale * (m[:d, :d] @ mu_s)
    m[:d, :d] *= scale
    return m


def align_matrix(kpts: np.ndarray, size: int = CROP) -> np.ndarray:
    """[..., 3, 3] image -> crop index-coordinate similarity for landmarks [..., 68, 2] given in
    our pixel coordinates (centres at +0.5); the crop is `size` x `size` (template scaled)."""
    pts = five_points(kpts) - 0.5
    dst = ARCFACE_TEMPLATE * (size / CROP)
    flat = pts.reshape(-1, 5, 2)
    out = np.stack([similarity_transform(p, dst) for p in flat])
    return out.reshape(*pts.shape[:-2], 3, 3)


@jax.jit(static_argnames=("size",))
def warp_affine(image: jax.Array, matrix: jax.Array, size: int = CROP) -> jax.Array:
    """Crop [size, size, C] with crop(p) = image(matrix^-1 p) in index coordinates, bilinear,
    neighbours outside the image read as 0 (cv2.warpAffine INTER_LINEAR, borderValue 0).
    image [H, W, C]; matrix [3, 3] image -> crop."""
    h, w = image.shape[:2]
    inv = jnp.linalg.inv(matrix.astype(jnp.float32))
    g = jnp.arange(size, dtype=jnp.float32)
    gx, gy = jnp.meshgrid(g, g)
    x = inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2]
    y = inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]

    def at(yy, xx):
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        v = image[
            jnp.clip(yy, 0, h - 1).astype(jnp.int32), jnp.clip(xx, 0, w - 1).astype(jnp.int32)
        ]
        return jnp.where(ok[..., None], v, 0)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bot = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return (top * (1 - fy) + bot * fy).astype(image.dtype)


def align_faces(images: jax.Array, kpts: np.ndarray, size: int = CROP) -> jax.Array:
    """ArcFace crops [N, size, size, C] of images [N, H, W, C] with iBUG-68 landmarks [N, 68, 2]
    (our pixel coordinates)."""
    m = jnp.asarray(align_matrix(kpts, size), jnp.float32)
    return jax.vmap(lambda im, mm: warp_affine(im, mm, size))(images, m)


# ----------------------------------------------------------------------------- face region
def _inside(pts: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """[N] bool, even-odd rule: points [N, 2] inside the closed polygon [P, 2]."""
    x, y = pts[:, 0:1], pts[:, 1:2]
    a, b = poly, np.roll(poly, -1, axis=0)
    crosses = (a[:, 1] > y) != (b[:, 1] > y)
    dy = np.where(b[:, 1] == a[:, 1], 1e-30, b[:, 1] - a[:, 1])
    xc = a[:, 0] + (y - a[:, 1]) * (b[:, 0] - a[:, 0]) / dy
    return (np.sum(crosses & (x < xc), axis=1) % 2) == 1


@lru_cache(maxsize=8)
def face_vertices(template: HeadTemplate) -> np.ndarray:
    """[V] bool: the template's face-region vertices (module docstring), from the rest pose;
    every vertex for a template without the 68 landmarks (a capture topology without them)."""
    v = template.verts.astype(np.float64)
    if max(OUTLINE_68) >= len(template.landmark_ids):
        return np.ones(len(v), bool)
    outline = v[template.landmark_ids[list(OUTLINE_68)]]
    front = (v[:, 2] >= outline[:, 2].min()) | (template.part_ids != PART_SKIN)
    return _inside(v[:, :2], outline[:, :2]) & front


@lru_cache(maxsize=8)
def face_triangles(template: HeadTemplate) -> np.ndarray:
    """[F] bool: triangles whose three corners are face-region vertices."""
    return face_vertices(template)[template.faces].all(-1)


def face_mask(
    template: HeadTemplate,
    verts: jax.Array,  # [V, 3] posed vertices, head coordinates
    camera: capture.Camera,
    bbox: tuple[int, int] | None = None,  # static raster block; measured when None
) -> jax.Array:
    """[H, W] bool: pixels whose front-most triangle of the posed mesh is a face triangle."""
    if bbox is None:
        bbox = capture.auto_bbox(verts, template.faces, camera)
    xy, inv_z, valid = capture.screen_triangles(verts, template.faces, camera)
    fid, _, _ = raster.rasterize(
        xy, inv_z, valid, height=camera.height, width=camera.width, by=bbox[0], bx=bbox[1]
    )
    return (fid >= 0) & jnp.asarray(face_triangles(template))[jnp.maximum(fid, 0)]


def record_face_masks(record: dict, template: HeadTemplate) -> np.ndarray:
    """[V, H, W] bool face masks of every view of a schema record whose geometry follows
    `template` (synthetic records: posed from `id_coeffs`, `view_expression`, `view_gaze`)."""
    _, h, w, _ = np.asarray(record["view_image"]).shape
    out = []
    for k, viewmat, expr, gaze in zip(
        record["view_K"],
        record["view_viewmat"],
        record["view_expression"],
        record["view_gaze"],
        strict=True,
    ):
        verts = pose_vertices(
            template, jnp.asarray(record["id_coeffs"]), jnp.asarray(expr), jnp.asarray(gaze)
        )
        out.append(face_mask(template, verts, capture.Camera(k, viewmat, w, h)))
    return np.stack(jax.device_get(out))
