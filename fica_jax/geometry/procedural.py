"""Procedural head surface: head + neck skin, two eyeballs and a mouth bag with a UV atlas.

Stands in for the proprietary capture template of FiCA (the UV texture/geometry maps of Sec. 2.2
live on it). The skin is a latitude/longitude grid over a skull ellipsoid that blends into a neck
cylinder, with smooth bumps for nose, brows, cheeks, lips, chin and ears, eye sockets and a cut
along the lips so the jaw can open onto the mouth bag. Columns and rows are warped so the face
gets more vertices (and UV area) than the back of the head.

Everything is built on *positions* (one per 3D point) and *UV nodes*; a mesh vertex is a unique
(position, UV node) pair, so vertices are split at UV seams and `weld` maps each one back to its
position. Coordinates: metres, +y up, +z towards the face, +x the subject's left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PART_SKIN, PART_EYE_L, PART_EYE_R, PART_MOUTH = 0, 1, 2, 3
PART_NAMES = ("skin", "eye_left", "eye_right", "mouth")

PI = np.pi
SKULL = np.array([0.077, 0.125, 0.098])  # semi-axes x, y, z
SKULL_Z = -0.005  # skull centre z
THETA_MAX = 0.74 * PI  # polar angle where the skull hands over to the neck
HEAD_ROW_FRACTION = 0.8  # share of skin rows on the skull (rest: neck)
NECK_TOP, NECK_LEN, NECK_R, NECK_Z = -0.095, 0.085, np.array([0.052, 0.05]), -0.012
EYE_PHI, EYE_THETA, EYE_R = 0.40, 0.45 * PI, 0.0125
MOUTH_THETA, MOUTH_PHI = 0.615 * PI, 0.30
JAW_PIVOT = np.array([0.0, -0.005, -0.01])
JAW_ANGLE = 0.35  # radians of rotation at jaw_open = 1

# Atlas charts (u0, v0, u1, v1); a gutter between charts keeps bilinear lookups apart.
CHART_SKIN = (0.004, 0.004, 0.996, 0.79)
CHART_EYE_R = (0.004, 0.81, 0.196, 0.996)  # subject's right eye (-x)
CHART_EYE_L = (0.204, 0.81, 0.396, 0.996)
CHART_MOUTH = (0.45, 0.81, 0.996, 0.996)


def smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((np.asarray(x, np.float64) - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def bump(theta, phi, t0, p0, st, sp):
    """Gaussian in (polar angle, azimuth) around (t0, p0)."""
    return np.exp(-0.5 * ((theta - t0) / st) ** 2 - 0.5 * ((phi - p0) / sp) ** 2)


@dataclass
class Builder:
    """Accumulates positions (with attributes), UV nodes and triangles (pos ids, uv ids)."""

    pos: list = field(default_factory=list)
    part: list = field(default_factory=list)
    theta: list = field(default_factory=list)  # angular anchor used by the blendshapes
    phi: list = field(default_factory=list)
    uv: list = field(default_factory=list)
    tri_pos: list = field(default_factory=list)
    tri_uv: list = field(default_factory=list)
    n_pos: int = 0
    n_uv: int = 0

    def add_pos(self, p, part, theta, phi) -> np.ndarray:
        p = np.asarray(p, np.float64).reshape(-1, 3)
        n = len(p)
        self.pos.append(p)
        self.part.append(np.full(n, part, np.int8))
        self.theta.append(np.broadcast_to(np.asarray(theta, np.float64), (n,)).copy())
        self.phi.append(np.broadcast_to(np.asarray(phi, np.float64), (n,)).copy())
        self.n_pos += n
        return np.arange(self.n_pos - n, self.n_pos)

    def add_uv(self, uv) -> np.ndarray:
        uv = np.asarray(uv, np.float64).reshape(-1, 2)
        self.uv.append(uv)
        self.n_uv += len(uv)
        return np.arange(self.n_uv - len(uv), self.n_uv)

    def cat(self, name):
        return np.concatenate(getattr(self, name))


def grid_topology(rows: int, cols: int, bottom_pole: bool):
    """Lat/long grid of (rows+1) x (cols+1) UV nodes: quads split in two triangles.

    Returns node (r, c) arrays of each triangle corner [T, 3] as flat node ids, and the position
    key of each node: row 0 (and row `rows` if bottom_pole) collapse to one pole, column `cols`
    wraps onto column 0. Degenerate triangles at the poles are dropped.
    """
    r, c = np.meshgrid(np.arange(rows + 1), np.arange(cols + 1), indexing="ij")
    key = r * cols + (c % cols)
    key[0, :] = -1  # top pole
    if bottom_pole:
        key[rows, :] = -2
    node = r * (cols + 1) + c
    a, b = node[:-1, :-1], node[:-1, 1:]
    d, e = node[1:, :-1], node[1:, 1:]
    tris = np.concatenate(
        [np.stack([a, d, e], -1).reshape(-1, 3), np.stack([a, e, b], -1).reshape(-1, 3)]
    )
    k = key.reshape(-1)[tris]
    keep = (k[:, 0] != k[:, 1]) & (k[:, 1] != k[:, 2]) & (k[:, 0] != k[:, 2])
    return tris[keep], key


def chart_uv(rows: int, cols: int, chart, s=None, t=None) -> np.ndarray:
    """UV of every node of a (rows+1) x (cols+1) grid laid out in chart (u0, v0, u1, v1)."""
    u0, v0, u1, v1 = chart
    s = np.linspace(0, 1, cols + 1) if s is None else s
    t = np.linspace(0, 1, rows + 1) if t is None else t
    uu, vv = np.meshgrid(u0 + (u1 - u0) * s, v0 + (v1 - v0) * t)
    return np.stack([uu, vv], -1).reshape(-1, 2)


def add_grid(b: Builder, rows, cols, chart, node_pos, bottom_pole, tris_override=None):
    """Adds a grid whose node positions come from node_pos(key grid) -> pos ids per node."""
    tris, key = grid_topology(rows, cols, bottom_pole)
    if tris_override is not None:
        tris = tris_override(tris, key)
    pid = node_pos(key)  # [(rows+1)*(cols+1)] pos id of each node (or pos ids after override)
    uvid = b.add_uv(chart_uv(rows, cols, chart))
    b.tri_pos.append(pid[tris])
    b.tri_uv.append(uvid[tris])
    return tris, key


def skull_point(theta, phi):
    """Base skull surface and its outward normal at polar angle theta, azimuth phi."""
    low = smoothstep(0.55 * PI, 0.8 * PI, theta)
    front = np.clip(np.cos(phi), 0, 1)
    ax = SKULL[0] * (1 - 0.15 * low)
    x = ax * np.sin(theta) * np.sin(phi)
    y = SKULL[1] * np.cos(theta) - 0.02 * low * front
    z = SKULL[2] * np.sin(theta) * np.cos(phi) + SKULL_Z
    p = np.stack([x, y, z], -1)
    n = np.stack([x / ax**2, (y) / SKULL[1] ** 2, (z - SKULL_Z) / SKULL[2] ** 2], -1)
    return p, n / np.linalg.norm(n, axis=-1, keepdims=True)


def face_relief(theta, phi, mouth_theta):
    """Displacement (m, along the normal) sculpting the face onto the skull."""
    d = 0.022 * bump(theta, phi, 0.545 * PI, 0, 0.035 * PI, 0.08)  # nose tip
    d += 0.012 * bump(theta, phi, 0.49 * PI, 0, 0.05 * PI, 0.06)  # nose bridge
    d += 0.006 * bump(theta, phi, 0.56 * PI, 0, 0.02 * PI, 0.16)  # nostril wings
    for s in (-1, 1):
        d -= 0.010 * bump(theta, phi, EYE_THETA, s * EYE_PHI, 0.035 * PI, 0.17)  # sockets
        d += 0.006 * bump(theta, phi, 0.39 * PI, s * 0.36, 0.025 * PI, 0.22)  # brow ridge
        d += 0.006 * bump(theta, phi, 0.54 * PI, s * 0.62, 0.06 * PI, 0.22)  # cheeks
        d += 0.010 * bump(theta, phi, 0.50 * PI, s * PI / 2, 0.06 * PI, 0.10)  # ears
    d += 0.007 * bump(theta, phi, mouth_theta - 0.025 * PI, 0, 0.02 * PI, 0.2)  # upper lip
    d += 0.007 * bump(theta, phi, mouth_theta + 0.03 * PI, 0, 0.022 * PI, 0.18)  # lower lip
    d -= 0.003 * bump(theta, phi, mouth_theta, 0, 0.008 * PI, 0.2)  # lip line
    d += 0.008 * bump(theta, phi, 0.70 * PI, 0, 0.04 * PI, 0.2)  # chin
    return d


@dataclass
class Layout:
    """Where the head's features ended up (angles and node indices of the skin grid)."""

    rows: int
    cols: int
    row_theta: np.ndarray  # [rows+1] polar angle (neck rows continue past THETA_MAX)
    col_phi: np.ndarray  # [cols+1] azimuth
    head_rows: int
    mouth_row: int
    mouth_cols: tuple[int, int]
    skin_pid: np.ndarray  # [(rows+1)*(cols+1)] pos id of each skin node (upper lip side)
    lip_pid: dict  # column -> pos id of the lower-lip copy of mouth-row nodes
    eye_centres: np.ndarray  # [2, 3] (left = +x first)
    mouth_centre: np.ndarray  # [3] mouth bag centre


def skin_grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Row polar angles (warped: denser over the face) and column azimuths (denser in front)."""
    head_rows = round(HEAD_ROW_FRACTION * rows)
    x = np.arange(head_rows + 1) / head_rows
    beta, x0 = 0.5, 0.72
    h = x - beta / (2 * PI) * (np.sin(2 * PI * (x - x0)) + np.sin(2 * PI * x0))
    neck = THETA_MAX + 0.5 * np.arange(1, rows - head_rows + 1) / (rows - head_rows)
    theta = np.concatenate([THETA_MAX * h, neck])
    s = np.linspace(-1, 1, cols + 1)
    alpha = 1.2
    phi = PI * (s + alpha * s**3) / (1 + alpha)
    return theta, phi, head_rows


def build(rows: int = 48, eye_rows: int = 10, mouth_rows: int = 8):
    """Builds the procedural head. Returns (Builder, Layout)."""
    cols = 2 * rows
    b = Builder()
    theta, phi, head_rows = skin_grid(rows, cols)
    mouth_row = int(np.argmin(np.abs(theta - MOUTH_THETA)))
    corners = (int(np.argmin(np.abs(phi + MOUTH_PHI))), int(np.argmin(np.abs(phi - MOUTH_PHI))))
    p, skin_pid, lip_pid = _add_skin(b, theta, phi, mouth_row, corners)
    eye_centres = _add_eyes(b, eye_rows)
    mouth_centre = _add_mouth_bag(b, mouth_rows, p[mouth_row - 1, cols // 2], theta[mouth_row])
    layout = Layout(
        rows,
        cols,
        theta,
        phi,
        head_rows,
        mouth_row,
        corners,
        skin_pid,
        lip_pid,
        eye_centres,
        mouth_centre,
    )
    return b, layout


def _skin_surface(tt: np.ndarray, pp: np.ndarray, mouth_theta: float) -> np.ndarray:
    """Skin positions at polar angles tt, azimuths pp [rows, cols]: the skull blending into the
    neck cylinder past THETA_MAX, with the face relief along the normal on the skull part."""
    p_head, n_head = skull_point(np.minimum(tt, THETA_MAX), pp)
    u = np.clip((tt - THETA_MAX) / 0.5, 0, 1)[..., None]
    neck = np.stack(
        [NECK_R[0] * np.sin(pp), NECK_TOP - NECK_LEN * u[..., 0], NECK_Z + NECK_R[1] * np.cos(pp)],
        -1,
    )
    w = smoothstep(0, 0.6, u)
    p = (1 - w) * p_head + w * neck
    n = (1 - w) * n_head + w * np.stack([np.sin(pp), 0 * pp, np.cos(pp)], -1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return p + face_relief(tt, pp, mouth_theta)[..., None] * n * (1 - w)


def _add_skin(b: Builder, theta, phi, mouth_row: int, corners: tuple[int, int]):
    """Skin positions (one per key: the pole, then rows 1.. x cols) and triangles, cut open
    between the lips. -> (positions [rows, cols, 3], pos id of each node, lower-lip pos ids)."""
    rows, cols = len(theta) - 1, len(phi) - 1
    c0, c1 = corners
    mouth_theta = theta[mouth_row]
    tt, pp = np.meshgrid(theta[1:], phi[:-1], indexing="ij")
    p = _skin_surface(tt, pp, mouth_theta)
    top = np.array([[0.0, SKULL[1], SKULL_Z]])
    pole_id = b.add_pos(top, PART_SKIN, 0.0, 0.0)[0]
    grid_ids = b.add_pos(p.reshape(-1, 3), PART_SKIN, tt.reshape(-1), pp.reshape(-1))
    # lower-lip copies of the mouth-row nodes strictly between the corners
    lip_cols = list(range(c0 + 1, c1))
    lip_ids = b.add_pos(p[mouth_row - 1, lip_cols], PART_SKIN, mouth_theta + 1e-3, phi[lip_cols])
    lip_pid = dict(zip(lip_cols, lip_ids, strict=True))

    tris, key = grid_topology(rows, cols, bottom_pole=False)
    skin_pid = np.where(key == -1, pole_id, grid_ids[0] + np.maximum(key - cols, 0)).reshape(-1)
    tri_pid = skin_pid[tris]
    # faces just below the mouth row use the lower-lip copies: this is the cut between the lips
    node_r, node_c = np.divmod(tris, cols + 1)
    below = (node_r.max(1) == mouth_row + 1) & (node_r.min(1) == mouth_row)
    for j in range(3):
        sel = below & (node_r[:, j] == mouth_row) & (node_c[:, j] > c0) & (node_c[:, j] < c1)
        tri_pid[sel, j] = [lip_pid[c] for c in node_c[sel, j]]
    s_nodes = np.linspace(0, 1, cols + 1)
    t_nodes = np.linspace(0, 1, rows + 1)
    uvid = b.add_uv(chart_uv(rows, cols, CHART_SKIN, s_nodes, t_nodes))
    b.tri_pos.append(tri_pid)
    b.tri_uv.append(uvid[tris])
    return p, skin_pid, lip_pid


def _add_eyes(b: Builder, eye_rows: int) -> np.ndarray:
    """Eyeballs: spheres with poles on the y axis, azimuth 0 looking down +z. -> centres [2, 3]
    (left = +x first)."""
    eye_centres = []
    for part, sign, chart in ((PART_EYE_L, 1, CHART_EYE_L), (PART_EYE_R, -1, CHART_EYE_R)):
        p0, n0 = skull_point(np.array(EYE_THETA), np.array(sign * EYE_PHI))
        centre = p0 - n0 * (EYE_R - 0.005)
        eye_centres.append(centre)
        radii = np.full(3, EYE_R)
        _sphere(b, eye_rows, 2 * eye_rows, chart, centre, radii, part, EYE_THETA, sign * EYE_PHI)
    return np.stack(eye_centres)


def _add_mouth_bag(b: Builder, mouth_rows: int, lip_front: np.ndarray, mouth_theta) -> np.ndarray:
    """Mouth bag: an ellipsoid right behind the lips, visible only when the lips part. -> its
    centre [3]."""
    mouth_centre = np.array([0.0, lip_front[1] - 0.002, lip_front[2] - 0.026])
    radii = np.array([0.022, 0.013, 0.02])
    rows, cols = mouth_rows, 2 * mouth_rows
    _sphere(b, rows, cols, CHART_MOUTH, mouth_centre, radii, PART_MOUTH, mouth_theta, 0.0)
    return mouth_centre


def _sphere(b: Builder, rows, cols, chart, centre, radii, part, theta_anchor, phi_anchor):
    """Ellipsoid lat/long grid (both poles) added to the builder."""
    lat = np.linspace(0, PI, rows + 1)[1:-1]
    lon = np.linspace(-PI, PI, cols + 1)[:-1]
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    unit = np.stack([np.sin(la) * np.sin(lo), np.cos(la), np.sin(la) * np.cos(lo)], -1)
    pts = np.concatenate([[[0, 1, 0]], unit.reshape(-1, 3), [[0, -1, 0]]]) * radii + centre
    ids = b.add_pos(pts, part, theta_anchor, phi_anchor)

    def node_pos(key):
        k = key.reshape(-1)
        return np.where(k == -1, ids[0], np.where(k == -2, ids[-1], ids[0] + k - cols + 1))

    add_grid(b, rows, cols, chart, node_pos, bottom_pole=True)


def outward_flip(pos: np.ndarray, tri_pos: np.ndarray, part: np.ndarray) -> np.ndarray:
    """[T] bool: triangles of parts whose normals point inwards and must be flipped (per part).

    Eyes and mouth bag are measured from their centre; the skin is a tube along y, so it is
    measured from the y axis.
    """
    flip = np.zeros(len(tri_pos), bool)
    tri_part = part[tri_pos[:, 0]]
    for k in np.unique(tri_part):
        sel = tri_part == k
        t = pos[tri_pos[sel]]
        nrm = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
        out = t.mean(1) - (np.zeros(3) if k == PART_SKIN else pos[part == k].mean(0))
        if k == PART_SKIN:
            out[:, 1] = 0
        flip[sel] = np.sum(np.einsum("fc,fc->f", nrm, out)) < 0
    return flip
