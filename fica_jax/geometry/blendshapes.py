"""Identity shape space and expression blendshapes of the procedural head template.

FiCA drives avatars by an expression code (Sec. 2.3 uses ground-truth pose and expression to
overlay the mesh; Sec. 2.4 the UPM decoder takes expression e and gaze g). The synthetic data
need a template whose identity shape and expression are linear: `verts = rest + sum_s a_s B_s +
sum_e w_e E_e`. Every basis here is a smooth displacement field evaluated on the template's
*positions* through their angular anchors (polar angle theta from the crown, azimuth phi from
the face), so a basis is a few lines of geometry instead of sculpted data. Eyeballs are anchored
at their centre (they move rigidly); the mouth bag follows the jaw.

Units: a shape coefficient of 1 is about one standard deviation of natural variation (a few
mm); expression weights run 0 (neutral) to 1 (full).
"""

from __future__ import annotations

import numpy as np

from fica_jax.geometry.procedural import (
    EYE_PHI,
    EYE_THETA,
    JAW_ANGLE,
    JAW_PIVOT,
    MOUTH_PHI,
    NECK_Z,
    PART_EYE_L,
    PART_EYE_R,
    PART_MOUTH,
    PART_SKIN,
    PI,
    SKULL_Z,
    THETA_MAX,
    smoothstep,
)

SHAPE_NAMES = (
    "head_width",
    "head_length",
    "head_height",
    "jaw_width",
    "chin_protrusion",
    "chin_length",
    "nose_size",
    "nose_length",
    "nose_width",
    "cheek_fullness",
    "forehead_slope",
    "ear_size",
    "eye_spacing",
    "brow_ridge",
    "lip_fullness",
    "neck_width",
    "face_depth",
    "occiput_bulge",
)

EXPR_NAMES = (
    "jaw_open",
    "lips_pucker",
    "lips_stretch",
    "smile_left",
    "smile_right",
    "frown",
    "brow_up_left",
    "brow_up_right",
    "brow_down_left",
    "brow_down_right",
    "blink_left",
    "blink_right",
    "cheek_puff",
    "mouth_left",
    "mouth_right",
    "upper_lip_raise",
    "lower_lip_depress",
    "nose_wrinkle",
)


def _g(theta, phi, t0, p0, st, sp):
    dphi = (phi - p0 + PI) % (2 * PI) - PI  # wrap so bumps at the back work
    return np.exp(-0.5 * ((theta - t0) / st) ** 2 - 0.5 * (dphi / sp) ** 2)


class Anchors:
    """Per-position inputs of the basis functions (P positions)."""

    def __init__(self, pos, part, theta, phi, eye_centres, mouth_theta, mouth_centre):
        self.part = part
        self.theta = theta
        self.phi = phi
        self.mouth_theta = mouth_theta
        self.mouth_centre = mouth_centre
        ref = pos.copy()
        ref[part == PART_EYE_L] = eye_centres[0]
        ref[part == PART_EYE_R] = eye_centres[1]
        self.pos = pos
        self.ref = ref  # eyes follow the shape field at their centre, i.e. rigidly
        # approximate outward normal: skull ellipsoid gradient, horizontal on the neck
        n = np.stack(
            [ref[:, 0] / 0.077**2, ref[:, 1] / 0.125**2, (ref[:, 2] - SKULL_Z) / 0.098**2], -1
        )
        neck = np.stack([ref[:, 0], 0 * ref[:, 0], ref[:, 2] - NECK_Z], -1)
        w = smoothstep(THETA_MAX, THETA_MAX + 0.2, theta)[:, None]
        n = n / np.linalg.norm(n, axis=-1, keepdims=True)
        neck = neck / np.maximum(np.linalg.norm(neck, axis=-1, keepdims=True), 1e-9)
        n = (1 - w) * n + w * neck
        self.n = n / np.linalg.norm(n, axis=-1, keepdims=True)
        self.head = 1 - smoothstep(THETA_MAX, THETA_MAX + 0.3, theta)
        self.front = np.clip(np.cos(phi), 0, 1) ** 2

    def g(self, t0, p0, st, sp):
        return _g(self.theta, self.phi, t0, p0, st, sp)[:, None]


def shape_basis(a: Anchors) -> np.ndarray:
    """Identity shape basis [S, P, 3] in metres per unit coefficient."""
    th, x, y, z = a.theta, a.ref[:, 0], a.ref[:, 1], a.ref[:, 2]
    zero = np.zeros_like(x)
    n, hd, fr = a.n, a.head, a.front
    tm = a.mouth_theta
    nose = a.g(0.545 * PI, 0, 0.04 * PI, 0.09) + 0.5 * a.g(0.49 * PI, 0, 0.05 * PI, 0.06)
    both = lambda t0, p0, st, sp: a.g(t0, p0, st, sp) + a.g(t0, -p0, st, sp)
    low = smoothstep(0.55 * PI, 0.72 * PI, th)
    bases = [
        np.stack([0.05 * x * hd, zero, zero], -1),
        np.stack([zero, zero, 0.05 * (z - SKULL_Z) * hd], -1),
        np.stack([zero, 0.05 * np.maximum(y, 0) * hd, zero], -1),
        np.stack([0.08 * x * low * hd, zero, zero], -1),
        np.array([0, 0, 0.006]) * a.g(0.70 * PI, 0, 0.05 * PI, 0.25),
        np.stack([zero, -0.006 * smoothstep(0.6 * PI, 0.72 * PI, th) * fr * hd, zero], -1),
        0.006 * n * nose,
        0.006 * n * a.g(0.53 * PI, 0, 0.04 * PI, 0.07),
        np.stack([0.25 * x, zero, zero], -1) * a.g(0.55 * PI, 0, 0.03 * PI, 0.15),
        0.005 * n * both(0.56 * PI, 0.6, 0.06 * PI, 0.22),
        np.stack([zero, zero, -0.008 * smoothstep(0.42 * PI, 0.15 * PI, th) * fr], -1),
        0.006 * n * both(0.5 * PI, PI / 2, 0.06 * PI, 0.10),
        np.stack([0.08 * x, zero, zero], -1) * both(EYE_THETA, EYE_PHI, 0.06 * PI, 0.15),
        0.004 * n * both(0.39 * PI, 0.36, 0.025 * PI, 0.22),
        0.003
        * n
        * (a.g(tm - 0.025 * PI, 0, 0.02 * PI, 0.2) + a.g(tm + 0.03 * PI, 0, 0.02 * PI, 0.18)),
        np.stack([0.08 * x, zero, 0.08 * (z - NECK_Z)], -1)
        * smoothstep(THETA_MAX, THETA_MAX + 0.2, th)[:, None],
        -0.006 * n * a.g(0.52 * PI, 0, 0.12 * PI, 0.45),
        0.008 * n * a.g(0.5 * PI, PI, 0.15 * PI, 0.6),
    ]
    out = np.stack(bases).astype(np.float64)
    # the mouth bag sits inside the head: let it follow the shape at the mouth only
    mouth = a.part == PART_MOUTH
    if mouth.any():
        out[:, mouth] = out[:, mouth].mean(1, keepdims=True)
    assert len(out) == len(SHAPE_NAMES)
    return out


def jaw_weight(a: Anchors) -> np.ndarray:
    """[P] how much each position follows the jaw rotation (0 above the lips, 1 on the chin)."""
    th, ph = a.theta, np.abs(a.phi)
    tm = a.mouth_theta
    lateral = np.maximum(ph - MOUTH_PHI, 0)
    line = tm - 0.10 * lateral  # the jaw line rises towards the ears
    width = 1e-3 + 0.25 * lateral  # sharp at the lips (the cut), soft on the cheeks
    w = smoothstep(0.0, 1.0, (th - line) / width)
    w *= 1 - smoothstep(0.9, 1.5, ph)
    w *= 1 - smoothstep(THETA_MAX + 0.05, THETA_MAX + 0.35, th)
    w = np.where(a.part == PART_SKIN, w, 0.0)
    mouth = a.part == PART_MOUTH
    w[mouth] = smoothstep(a.mouth_centre[1] + 0.004, a.mouth_centre[1] - 0.004, a.pos[mouth, 1])
    return w


def expr_basis(a: Anchors) -> np.ndarray:
    """Expression blendshapes [E, P, 3] (full expression at weight 1)."""
    th, x = a.theta, a.pos[:, 0]
    tm = a.mouth_theta
    n = a.n
    skin = (a.part == PART_SKIN)[:, None]
    mouth = (a.part == PART_MOUTH)[:, None]
    zero = np.zeros_like(x)
    c, s = np.cos(JAW_ANGLE), np.sin(JAW_ANGLE)
    rel = a.pos - JAW_PIVOT
    rot = np.stack([rel[:, 0], c * rel[:, 1] - s * rel[:, 2], s * rel[:, 1] + c * rel[:, 2]], -1)
    jaw = (rot - rel) * jaw_weight(a)[:, None]
    lips = a.g(tm, 0, 0.045 * PI, 0.3)
    corner_l = a.g(tm, MOUTH_PHI, 0.04 * PI, 0.12)
    corner_r = a.g(tm, -MOUTH_PHI, 0.04 * PI, 0.12)

    def brow(side, dy, dz):
        return np.array([0.0, dy, dz]) * a.g(0.40 * PI, side * 0.36, 0.05 * PI, 0.22)

    def blink(side):
        lid = a.g(EYE_THETA, side * EYE_PHI, 0.035 * PI, 0.15)
        return (0.02 * n + np.array([0.0, -0.003, 0.0])) * lid

    def smile(side):
        cn = corner_l if side > 0 else corner_r
        cheek = a.g(0.55 * PI, side * 0.5, 0.05 * PI, 0.15)
        return np.array([side * 0.004, 0.006, -0.002]) * cn + 0.003 * n * cheek

    upper = (th <= tm + 1e-4)[:, None]
    shift = a.g(tm, 0, 0.06 * PI, 0.4)
    bases = [
        jaw,
        (np.stack([-0.35 * x, zero, zero + 0.008], -1) * lips) * skin,
        np.stack([0.3 * x, zero, zero], -1) * a.g(tm, 0, 0.04 * PI, 0.35) * skin,
        smile(1) * skin,
        smile(-1) * skin,
        np.array([0.0, -0.005, 0.0]) * (corner_l + corner_r) * skin,
        brow(1, 0.006, 0.0) * skin,
        brow(-1, 0.006, 0.0) * skin,
        brow(1, -0.004, 0.001) * skin,
        brow(-1, -0.004, 0.001) * skin,
        blink(1) * skin,
        blink(-1) * skin,
        0.010
        * n
        * (a.g(0.58 * PI, 0.5, 0.06 * PI, 0.25) + a.g(0.58 * PI, -0.5, 0.06 * PI, 0.25))
        * skin,
        np.array([0.008, 0.0, 0.0]) * shift * (skin | mouth),
        np.array([-0.008, 0.0, 0.0]) * shift * (skin | mouth),
        np.array([0.0, 0.004, 0.0]) * a.g(tm - 0.02 * PI, 0, 0.02 * PI, 0.25) * upper * skin,
        np.array([0.0, -0.004, 0.0]) * a.g(tm + 0.03 * PI, 0, 0.025 * PI, 0.25) * ~upper * skin,
        np.array([0.0, 0.003, -0.001]) * a.g(0.52 * PI, 0, 0.04 * PI, 0.15) * skin,
    ]
    out = np.stack([np.broadcast_to(b, a.pos.shape) for b in bases]).astype(np.float64)
    assert len(out) == len(EXPR_NAMES)
    return out
