"""The head template: mesh, UV atlas, landmarks, shape/expression bases and posing.

FiCA's canonical avatar is a textured mesh in a fixed UV layout (Sec. 2.2: UV texture and
geometry maps; Sec. 2.3: keypoints from the mesh; Sec. 2.4: expression and gaze drive the UPM).
`HeadTemplate` holds such a template as plain numpy arrays, either procedural
(`make_head_template`, see `procedural.py` / `blendshapes.py`) or loaded from a user OBJ
(`obj.py`). `pose_vertices` is the differentiable JAX function every renderer and loss uses:

    verts = rest + shape_basis . id + expr_basis . expr, then eyeballs rotated by gaze.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import jax.numpy as jnp
import numpy as np

from fica_jax.geometry import blendshapes, procedural
from fica_jax.geometry.procedural import (
    EYE_PHI,
    EYE_THETA,
    MOUTH_PHI,
    PART_EYE_L,
    PART_EYE_R,
    PART_SKIN,
    PI,
)

N_LANDMARKS = 68  # iBUG-68 order: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67


@dataclass(frozen=True, eq=False)
class HeadTemplate:
    """A head mesh with UV atlas and linear shape/expression spaces (numpy arrays)."""

    name: str
    verts: np.ndarray  # [V, 3] float32 rest (mean identity, neutral) positions, metres
    faces: np.ndarray  # [F, 3] int32, counter-clockwise seen from outside
    uvs: np.ndarray  # [V, 2] float32 in [0, 1], v down
    weld: np.ndarray  # [V] int32: vertices with equal weld share a 3D position (UV seams)
    part_ids: np.ndarray  # [V] int8: procedural.PART_* (skin, eye_left, eye_right, mouth)
    landmark_ids: np.ndarray  # [L] int32 vertex ids, iBUG-68 order for the first 68
    shape_basis: np.ndarray  # [S, V, 3] float32
    expr_basis: np.ndarray  # [E, V, 3] float32
    eye_centres: np.ndarray  # [2, 3] float32 (left = +x, right)
    eye_masks: np.ndarray  # [2, V] bool
    shape_names: tuple[str, ...]
    expr_names: tuple[str, ...]

    def __post_init__(self):
        # templates are shared (cached, closed over by jitted functions): freeze the arrays
        for value in vars(self).values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False

    @property
    def n_verts(self) -> int:
        return len(self.verts)

    @property
    def n_shape(self) -> int:
        return len(self.shape_basis)

    @property
    def n_expr(self) -> int:
        return len(self.expr_basis)


def gaze_rotation(gaze: jnp.ndarray) -> jnp.ndarray:
    """[3, 3] rotation for gaze (yaw, pitch): yaw turns +z towards +x, pitch towards +y (up)."""
    yaw, pitch = gaze[0], gaze[1]
    cy, sy = jnp.cos(yaw), jnp.sin(yaw)
    cp, sp = jnp.cos(pitch), jnp.sin(pitch)
    ry = jnp.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = jnp.array([[1.0, 0.0, 0.0], [0.0, cp, sp], [0.0, -sp, cp]])  # +z -> +y by pitch
    return ry @ rx


def pose_vertices(
    template: HeadTemplate,
    id_coeffs: jnp.ndarray,  # [S]
    expr: jnp.ndarray,  # [E]
    gaze: jnp.ndarray,  # [2] (yaw, pitch) radians
) -> jnp.ndarray:
    """Posed vertices [V, 3] in head coordinates (differentiable in all three inputs)."""
    v = jnp.asarray(template.verts)
    v = v + jnp.einsum("s,svc->vc", id_coeffs, jnp.asarray(template.shape_basis))
    v = v + jnp.einsum("e,evc->vc", expr, jnp.asarray(template.expr_basis))
    rot = gaze_rotation(jnp.asarray(gaze, v.dtype))
    for k in range(2):
        mask = template.eye_masks[k]
        if not mask.any():
            continue
        ref = int(np.argmax(mask))
        # eyeballs translate rigidly with the shape/expression fields: shift the centre likewise
        centre = jnp.asarray(template.eye_centres[k]) + (v[ref] - template.verts[ref])
        turned = centre + (v - centre) @ rot.T
        v = jnp.where(jnp.asarray(mask)[:, None], turned, v)
    return v


def _landmark_targets(mouth_theta: float) -> list[tuple[float, float, bool]]:
    """(theta, phi, lower_lip) of the 68 iBUG landmarks on the skin grid (+x = image right)."""
    t = []
    for a in np.linspace(-1, 1, 17):  # jaw, from the subject's right ear to the left one
        t.append((0.50 * PI + 0.22 * PI * (1 - abs(a) ** 1.6), 1.2 * a, False))
    for side in (-1, 1):  # brows 17-21 (subject's right, -x) then 22-26
        phis = np.linspace(-0.62, -0.12, 5) if side < 0 else np.linspace(0.12, 0.62, 5)
        for p in phis:
            t.append((0.395 * PI + 0.015 * PI * ((abs(p) - 0.37) / 0.25) ** 2, p, False))
    for th in np.linspace(0.45, 0.545, 4):  # nose bridge 27-30
        t.append((th * PI, 0.0, False))
    for p in np.linspace(-0.12, 0.12, 5):  # nostrils 31-35
        t.append((0.565 * PI, p, False))
    d_phi, d_th = 0.11, 0.022 * PI
    for c in (-EYE_PHI, EYE_PHI):  # eyes 36-41 (right, -x) and 42-47, clockwise in the image
        t += [
            (EYE_THETA, c - d_phi, False),
            (EYE_THETA - d_th, c - d_phi / 3, False),
            (EYE_THETA - d_th, c + d_phi / 3, False),
            (EYE_THETA, c + d_phi, False),
            (EYE_THETA + d_th, c + d_phi / 3, False),
            (EYE_THETA + d_th, c - d_phi / 3, False),
        ]
    tm, mp = mouth_theta, MOUTH_PHI
    outer = [(0, -mp), (-0.014, -0.2), (-0.02, -0.08), (-0.018, 0), (-0.02, 0.08),
             (-0.014, 0.2), (0, mp), (0.02, 0.2), (0.03, 0.08), (0.032, 0), (0.03, -0.08),
             (0.02, -0.2)]  # fmt: skip
    t += [(tm + dt * PI, p, False) for dt, p in outer]  # 48-59
    inner = [
        (-0.24, False),
        (-0.1, False),
        (0.0, False),
        (0.1, False),
        (0.24, False),
        (0.1, True),
        (0.0, True),
        (-0.1, True),
    ]
    t += [(tm, p, low) for p, low in inner]  # 60-67: upper inner lip, then the lower copy
    return t


@lru_cache(maxsize=4)
def make_head_template(resolution: int = 48) -> HeadTemplate:
    """Procedural head template; `resolution` = skin grid rows (columns = 2x).

    resolution 48 gives ~5.5k vertices / ~10k faces: detailed enough for 256-512 px renders and
    fast on CPU. Cached: the template is immutable.
    """
    if resolution < 24:
        raise ValueError(f"template resolution {resolution} too small (need >= 24 rows)")
    b, lay = procedural.build(
        rows=resolution, eye_rows=max(8, resolution // 5), mouth_rows=max(6, resolution // 6)
    )
    pos, part = b.cat("pos"), b.cat("part")
    theta, phi, uvn = b.cat("theta"), b.cat("phi"), b.cat("uv")
    tri_pos, tri_uv = np.concatenate(b.tri_pos), np.concatenate(b.tri_uv)
    flip = procedural.outward_flip(pos, tri_pos, part)
    tri_pos[flip] = tri_pos[flip][:, ::-1]
    tri_uv[flip] = tri_uv[flip][:, ::-1]

    # one vertex per distinct (position, UV node) pair: splits vertices at UV seams
    pair = tri_pos.astype(np.int64) * len(uvn) + tri_uv
    keys, first, inverse = np.unique(pair.reshape(-1), return_index=True, return_inverse=True)
    order = np.argsort(first)  # keep vertices in order of first use
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    keys = keys[order]
    faces = rank[inverse].reshape(-1, 3).astype(np.int32)
    weld = (keys // len(uvn)).astype(np.int32)
    uvs = uvn[keys % len(uvn)]

    anchors = blendshapes.Anchors(
        pos, part, theta, phi, lay.eye_centres, lay.row_theta[lay.mouth_row], lay.mouth_centre
    )
    shape = blendshapes.shape_basis(anchors)[:, weld]
    expr = blendshapes.expr_basis(anchors)[:, weld]

    first_vertex = np.full(len(pos), -1, np.int64)
    first_vertex[weld[::-1]] = np.arange(len(weld))[::-1]
    lm = []
    for th, ph, lower in _landmark_targets(lay.row_theta[lay.mouth_row]):
        r = int(np.argmin(np.abs(lay.row_theta - th)))
        c = int(np.argmin(np.abs(lay.col_phi - ph)))
        pid = lay.skin_pid[r * (lay.cols + 1) + c]
        if lower:
            pid = lay.lip_pid[c]
        lm.append(first_vertex[pid])
    vpart = part[weld]
    return HeadTemplate(
        name=f"fica-procedural-head-r{resolution}",
        verts=pos[weld].astype(np.float32),
        faces=faces,
        uvs=uvs.astype(np.float32),
        weld=weld,
        part_ids=vpart.astype(np.int8),
        landmark_ids=np.asarray(lm, np.int32),
        shape_basis=shape.astype(np.float32),
        expr_basis=expr.astype(np.float32),
        eye_centres=lay.eye_centres.astype(np.float32),
        eye_masks=np.stack([vpart == PART_EYE_L, vpart == PART_EYE_R]),
        shape_names=blendshapes.SHAPE_NAMES,
        expr_names=blendshapes.EXPR_NAMES,
    )


def skin_mask(template: HeadTemplate) -> np.ndarray:
    """[V] bool, vertices on the skin (head + neck) chart."""
    return template.part_ids == PART_SKIN


def vertex_regions(template: HeadTemplate) -> dict[str, np.ndarray]:
    """[V] bool masks of what drives each part of the head, read off the template's own bases:
    - "eyes": the eyeballs (gaze rotates them; no blendshape moves them),
    - "expressive": other vertices that some blendshape moves by >= 1 mm at full weight (lips,
      jaw, cheeks, brows, lids),
    - "back": vertices no blendshape moves by even 0.1 mm, behind the head's centre (3 cm behind
      its mid-depth): the back of the head, which neither expression nor gaze may change.
    """
    moved = np.linalg.norm(template.expr_basis, axis=-1).max(0)  # [V] m at full weight
    eyes = template.eye_masks.any(0)
    z = template.verts[:, 2]
    return {
        "eyes": eyes,
        "expressive": (moved >= 1e-3) & ~eyes,
        "back": (moved < 1e-4) & ~eyes & (z < 0.5 * (z.min() + z.max()) - 0.03),
    }


def uv_regions(template: HeadTemplate, resolution: int) -> dict[str, np.ndarray]:
    """`vertex_regions` and each eyeball ("eye_left", "eye_right") as [R, R] bool UV masks:
    texels whose whole face lies in the region. Evaluated eagerly (also inside a trace)."""
    import jax

    from fica_jax.geometry.uvmaps import uv_raster

    regions = vertex_regions(template)
    regions |= {"eye_left": template.eye_masks[0], "eye_right": template.eye_masks[1]}
    with jax.ensure_compile_time_eval():
        r = uv_raster(template.uvs, template.faces, resolution)
        out = {}
        for name, m in regions.items():
            inside = np.asarray(r.interpolate(jnp.asarray(m, jnp.float32)[:, None]))[..., 0]
            out[name] = r.mask & (inside > 0.999)
    return out
