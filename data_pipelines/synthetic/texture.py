"""Procedural UV albedo textures for synthetic identities.

The synthetic captures stand in for FiCA's phone/dome data (paper Sec. 3): every identity needs a
ground-truth UV texture whose visible part the portrait reveals and whose hidden part the
diffusion model must imagine (Sec. 2.2). Features are painted as functions of the *rest* 3D
position of each texel (found by rasterizing the template's rest vertices into UV), located from
the template's landmarks, so the painter works on any template with iBUG-68 landmarks and its
features land where the geometry has them: skin tone and blotches, cheeks, lips, eyebrows,
hair or a cap/hood, freckles, painted glasses, iris/pupil on the eyeballs, mouth interior/teeth.
"""

from __future__ import annotations

import numpy as np

from fica_jax.geometry.procedural import PART_EYE_L, PART_EYE_R, PART_MOUTH, PART_SKIN
from fica_jax.geometry.template import HeadTemplate

SKIN_TONES = np.array(
    [
        [0.98, 0.84, 0.74],
        [0.93, 0.76, 0.64],
        [0.86, 0.67, 0.53],
        [0.76, 0.56, 0.42],
        [0.62, 0.44, 0.32],
        [0.48, 0.33, 0.24],
        [0.36, 0.24, 0.18],
    ]
)
HAIR_COLOURS = np.array(
    [
        [0.08, 0.06, 0.05],
        [0.22, 0.14, 0.08],
        [0.42, 0.28, 0.15],
        [0.78, 0.64, 0.40],
        [0.58, 0.26, 0.12],
        [0.62, 0.62, 0.62],
    ]
)
IRIS_COLOURS = np.array(
    [
        [0.30, 0.18, 0.09],
        [0.16, 0.10, 0.06],
        [0.28, 0.45, 0.62],
        [0.32, 0.48, 0.30],
        [0.45, 0.36, 0.18],
    ]
)


def _smooth(a, b, x):
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _noise3(
    p: np.ndarray, rng: np.random.Generator, n: int, freq: tuple[float, float]
) -> np.ndarray:
    """Band-limited 3D noise (sum of random plane waves) at points p [..., 3], values ~[-1, 1]."""
    out = np.zeros(p.shape[:-1])
    for _ in range(n):
        k = rng.normal(size=3)
        k *= rng.uniform(*freq) / np.linalg.norm(k)
        out += np.sin(p @ k + rng.uniform(0, 2 * np.pi))
    return out / np.sqrt(n / 2)


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of 2D points p [..., 2] to the segment a-b."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(ab @ ab, 1e-12), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def _polyline_dist(p: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.min([_seg_dist(p, pts[i], pts[i + 1]) for i in range(len(pts) - 1)], axis=0)


def paint_texture(
    template: HeadTemplate,
    rest_map: np.ndarray,  # [R, R, 3] rest position of each texel (template.verts in UV)
    part_map: np.ndarray,  # [R, R] int part id per texel (-1 off the atlas)
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict]:
    """Returns (albedo [R, R, 3] float32 in [0, 1], dict of the sampled appearance traits).

    The features are painted in a fixed order, each drawing from `rng` in turn, so a seed gives
    the same texture whatever the template resolution asks of each painter."""
    p = rest_map.astype(np.float64)
    lm = template.verts[template.landmark_ids].astype(np.float64)
    skin_px = part_map == PART_SKIN
    tex, tone = _paint_skin(p, lm, rng)
    traits = {"skin_tone": tone}
    tex = _paint_lips(tex, p, lm, tone, rng)
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.85, 1.15, 3)
    tex = _paint_brows(tex, p, lm, hair, rng)
    tex, traits["headwear"] = _paint_headwear(tex, p, lm, skin_px, hair, rng)
    if rng.random() < 0.3:
        freckled = _paint_freckles(tex, p, lm, template, skin_px, rng)
        if freckled is not None:
            tex, traits["freckles"] = freckled, True
    if rng.random() < 0.2:
        tex, traits["glasses"] = _paint_glasses(tex, p, lm, skin_px, rng), True
    _paint_eyes(tex, p, part_map, template.eye_centres, rng)
    _paint_mouth(tex, p, part_map)
    tex = np.where((part_map >= 0)[..., None], tex, 0.0)
    return np.clip(tex, 0.0, 1.0).astype(np.float32), traits


def _blend(tex: np.ndarray, a: np.ndarray, colour) -> np.ndarray:
    """tex [R, R, 3] over-painted with colour where a [R, R] (coverage in [0, 1]) says."""
    return tex * (1 - a[..., None]) + a[..., None] * colour


def _paint_skin(p: np.ndarray, lm: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Skin tone, low-frequency blotches, rosy cheeks, slight darkening on the neck.
    -> (texture [R, R, 3], tone [3])."""
    w = rng.uniform(0, len(SKIN_TONES) - 1)
    i = int(w)
    tone = SKIN_TONES[i] * (1 - (w - i)) + SKIN_TONES[min(i + 1, len(SKIN_TONES) - 1)] * (w - i)
    tone = tone * rng.uniform(0.95, 1.05, 3)
    tex = np.broadcast_to(tone, p.shape).copy()
    tex *= (1 + 0.05 * _noise3(p, rng, 6, (30, 90)))[..., None]
    tex *= (1 + 0.02 * _noise3(p, rng, 6, (300, 600)))[..., None]
    cheek_c = [lm[[1, 31, 48]].mean(0), lm[[15, 35, 54]].mean(0)]
    rosy = sum(np.exp(-np.sum((p - c) ** 2, -1) / (2 * 0.015**2)) for c in cheek_c)
    tex = tex * (1 - 0.15 * rosy[..., None]) + 0.15 * rosy[..., None] * tone * [1.1, 0.75, 0.75]
    tex *= (1 - 0.12 * _smooth(-0.09, -0.14, p[..., 1]))[..., None]
    return tex, tone


def _paint_lips(tex, p, lm, tone, rng) -> np.ndarray:
    """Lips: an ellipse spanning the mouth landmarks, on the front of the head."""
    mouth = lm[48:60]
    mc = mouth.mean(0)
    half_w = 0.5 * (mouth[:, 0].max() - mouth[:, 0].min())
    half_h = 0.5 * (mouth[:, 1].max() - mouth[:, 1].min())
    lip_d = ((p[..., 0] - mc[0]) / half_w) ** 2 + ((p[..., 1] - mc[1]) / half_h) ** 2
    lip_col = tone * rng.uniform(0.6, 0.8) * np.array([1.15, 0.7, 0.72])
    return _blend(tex, (1 - _smooth(0.8, 1.0, lip_d)) * (p[..., 2] > 0.02), lip_col)


def _paint_brows(tex, p, lm, hair, rng) -> np.ndarray:
    """Eyebrows: thick polylines just above the brow landmarks, in a shade of the hair."""
    brow_w = rng.uniform(0.003, 0.006)
    brow_col = hair * rng.uniform(0.6, 0.9)
    for idx in (slice(17, 22), slice(22, 27)):
        pts = lm[idx, :2] + [0, 0.002]
        d = _polyline_dist(p[..., :2], pts)
        a = (1 - _smooth(brow_w * 0.6, brow_w, d)) * (p[..., 2] > lm[idx, 2].min() - 0.02)
        tex = tex * (1 - 0.9 * a[..., None]) + 0.9 * a[..., None] * brow_col
    return tex


def _paint_headwear(tex, p, lm, skin_px, hair, rng) -> tuple[np.ndarray, str]:
    """Hair, a cap, a hood or nothing (bald). -> (texture, the style drawn)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    brow_y = lm[17:27, 1].max()
    phi = np.arctan2(x, z)
    style = rng.choice(
        ["hair", "hair", "hair", "bald", "cap", "hood"], p=[0.3, 0.2, 0.15, 0.1, 0.12, 0.13]
    )
    if style in ("hair", "cap"):
        front_h = brow_y + rng.uniform(0.03, 0.055)
        back_h = rng.uniform(-0.09, 0.0) if style == "hair" else brow_y + 0.02
        side = _smooth(0.5, 1.9, np.abs(phi))
        line = front_h * (1 - side) + back_h * side
        line = line + 0.004 * np.sin(phi * rng.uniform(6, 14) + rng.uniform(0, 6))
        a = _smooth(line - 0.002, line + 0.003, y) * skin_px
        col = hair if style == "hair" else rng.uniform(0.1, 0.9, 3)
        if style == "hair":
            strands = 1 + 0.12 * np.sin(phi * 180 + 30 * y) + 0.05 * _noise3(p, rng, 4, (200, 400))
            col = col * strands[..., None]
        tex = _blend(tex, a, col)
    elif style == "hood":
        face_c = lm[[27, 33, 8]].mean(0)
        oval = (x / rng.uniform(0.066, 0.076)) ** 2 + ((y - face_c[1] - 0.01) / 0.105) ** 2
        a = _smooth(0.85, 1.0, oval + (z < 0.03) * 2) * skin_px
        cloth = rng.uniform(0.05, 0.8, 3)
        fold = 1 + 0.08 * _noise3(p, rng, 5, (40, 120))
        tex = tex * (1 - a[..., None]) + a[..., None] * cloth * fold[..., None]
    return tex, str(style)


def _paint_freckles(tex, p, lm, template: HeadTemplate, skin_px, rng) -> np.ndarray | None:
    """Freckles on the nose and cheeks; None where the template has no skin there."""
    verts = template.verts[(template.part_ids == PART_SKIN)]
    near = verts[np.linalg.norm(verts[:, :2] - lm[30, :2], axis=-1) < 0.045]
    near = near[near[:, 2] > lm[30, 2] - 0.04]
    if not len(near):
        return None
    pick = near[rng.integers(len(near), size=int(rng.integers(20, 60)))]
    pick = pick + rng.normal(0, 0.002, pick.shape)
    d = np.min(np.linalg.norm(p[..., None, :] - pick, axis=-1), -1)
    a = (1 - _smooth(0.0006, 0.0012, d)) * skin_px
    return tex * (1 - 0.45 * a[..., None])


def _paint_glasses(tex, p, lm, skin_px, rng) -> np.ndarray:
    """Painted glasses: two rims around the eye landmarks and a bridge."""
    xy = p[..., :2]
    rim_r = rng.uniform(0.016, 0.02)
    frame = rng.uniform(0.0, 0.35, 3)
    eyes = [lm[36:42].mean(0), lm[42:48].mean(0)]
    d = np.min([np.abs(np.linalg.norm(xy - e[:2], axis=-1) - rim_r) for e in eyes], axis=0)
    d = np.minimum(d, _seg_dist(xy, eyes[0][:2] + [rim_r, 0], eyes[1][:2] - [rim_r, 0]))
    a = (1 - _smooth(0.0007, 0.0013, d)) * skin_px * (p[..., 2] > eyes[0][2] - 0.025)
    return _blend(tex, a, frame)


def _paint_eyes(tex, p, part_map, eye_centres, rng) -> None:
    """Eyeballs, in place: sclera, iris with radial streaks and limbal ring, pupil."""
    iris = IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))] * rng.uniform(0.8, 1.2, 3)
    iris_ang = rng.uniform(0.5, 0.58)
    for k, part in enumerate((PART_EYE_L, PART_EYE_R)):
        sel = part_map == part
        d = p[sel] - eye_centres[k]
        d /= np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-9)
        ang = np.arccos(np.clip(d[:, 2], -1, 1))
        rad_angle = np.arctan2(d[:, 1], d[:, 0])
        col = np.broadcast_to([0.93, 0.9, 0.87], d.shape).copy()
        col *= 1 - 0.2 * _smooth(0.9, 1.6, ang)[:, None]  # darker towards the socket
        streak = 1 + 0.18 * np.sin(rad_angle * 37) * np.sin(rad_angle * 11 + 1)
        ic = iris * streak[:, None] * (1 - 0.5 * _smooth(iris_ang - 0.1, iris_ang, ang))[:, None]
        ia = 1 - _smooth(iris_ang - 0.02, iris_ang + 0.02, ang)
        col = col * (1 - ia[:, None]) + ia[:, None] * ic
        pa = 1 - _smooth(0.17, 0.21, ang)
        col = col * (1 - pa[:, None]) + pa[:, None] * 0.03
        tex[sel] = col


def _paint_mouth(tex, p, part_map) -> None:
    """Mouth interior, in place: dark red bag, teeth band at the front, tongue below."""
    sel = part_map == PART_MOUTH
    if not sel.any():
        return
    q = p[sel]
    cy, cz = q[:, 1].mean(), q[:, 2].mean()
    col = np.broadcast_to([0.32, 0.08, 0.09], q.shape).copy()
    frontal = q[:, 2] > cz + 0.008
    teeth = frontal & (np.abs(q[:, 1] - cy) < 0.008) & (np.abs(q[:, 1] - cy) > 0.0008)
    tongue = (~frontal) & (q[:, 1] < cy - 0.004)
    col[tongue] = [0.62, 0.28, 0.3]
    col[teeth] = [0.92, 0.9, 0.82]
    tex[sel] = col
