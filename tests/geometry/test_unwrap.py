"""The portrait -> partial UV maps unwrap (fica_jax.geometry.unwrap)."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fica_jax.geometry import capture, uvmaps
from fica_jax.geometry.unwrap import unwrap_partial
from tests.geometry.test_capture import _camera, _render, scene  # noqa: F401 (fixture)

UV = 128


def _unwrap(out, resolution, **kw):
    maps = (jnp.asarray(out[k]) for k in ("rgb", "mask", "uv", "nrm", "vtx"))
    return np.asarray(unwrap_partial(*maps, resolution=resolution, **kw))


def test_grid_triangles_interpolate_between_pixel_centres():
    """2x2 foreground pixels on a UV square 4 texels wide: the texels between them get the
    bilinear-by-triangles blend of the four colours; a background pixel adds nothing."""
    r = 16
    uv = np.array([[[0.25, 0.25], [0.5, 0.25]], [[0.25, 0.5], [0.5, 0.5]]], np.float32)
    rgb = np.array([[[1, 0, 0], [0, 1, 0]], [[0, 0, 1], [1, 1, 1]]], np.float32)
    z = np.zeros((2, 2, 3), np.float32)
    out = np.asarray(unwrap_partial(rgb, np.ones((2, 2)), uv, z, z, resolution=r, max_edge=6.0))
    hit = out[..., 3] > 0
    # texel centres (k + 0.5) / 16 inside [0.25, 0.5]: k = 4..7 on both axes, and the texels
    # under the pixels themselves (floor(uv * 16): 4 or 8), nothing else
    want = np.zeros((r, r), bool)
    want[4:8, 4:8] = True
    want[8, 4] = want[4, 8] = want[8, 8] = True
    np.testing.assert_array_equal(hit, want)
    # texel (row 5, col 6): centre (6.5, 5.5) texels = (0.625, 0.375) of the square; in the
    # first triangle (top-left, top-right, bottom-left): weights (0, 0.625, 0.375)
    np.testing.assert_allclose(out[5, 6, :3], [0.0, 0.625, 0.375], atol=1e-6)
    # the same square with the bottom-right pixel in the background: one triangle only
    mask = np.array([[1, 1], [1, 0]])
    half = np.asarray(unwrap_partial(rgb, mask, uv, z, z, resolution=r, max_edge=6.0))
    tri = np.zeros((r, r), bool)
    for y in range(4, 8):
        for x in range(4, 8):
            tri[y, x] = (x + 0.5 - 4) + (y + 0.5 - 4) <= 4
    tri[8, 4] = tri[4, 8] = True
    np.testing.assert_array_equal(half[..., 3] > 0, tri)
    assert np.all(half[..., :3][tri].max(-1) <= 1.0) and np.all(half[~tri] == 0)


def test_long_edges_are_dropped_and_points_still_land():
    """Neighbouring pixels far apart in UV (a seam / silhouette): no triangle between them,
    each pixel still marks its own texel."""
    r = 32
    uv = np.array([[[0.1, 0.1], [0.9, 0.1]], [[0.1, 0.9], [0.9, 0.9]]], np.float32)
    rgb = np.ones((2, 2, 3), np.float32)
    z = np.zeros((2, 2, 3), np.float32)
    out = np.asarray(unwrap_partial(rgb, np.ones((2, 2)), uv, z, z, resolution=r, max_edge=4.0))
    assert (out[..., 3] > 0).sum() == 4  # the four pixels' texels only
    assert out[3, 3, 3] == 1 and out[28, 28, 3] == 1


@pytest.fixture(scope="module")
def views(scene):  # noqa: F811
    """One view of the textured head at 64 px (a demo portrait) and the same view at 512 px."""
    t, _, tex = scene
    return {s: _render(t, tex, _camera(25, 10, size=s)) for s in (64, 512)}


def test_unwrap_fills_only_what_the_portrait_sees(views):
    """At 64 px onto a 64^2 atlas, the unwrap covers a region, not dots: most of the texels
    that the same view sees at 8x the resolution (an independent reference: each 512 px pixel
    on its own texel), almost nothing outside them, with their colours."""
    r = 64
    ref = _unwrap(views[512], r, max_edge=0.0)  # points only
    seen = ref[..., 3] > 0
    got = _unwrap(views[64], r)
    dots = _unwrap(views[64], r, max_edge=0.0)
    hit, dot = got[..., 3] > 0, dots[..., 3] > 0
    coverage = (hit & seen).sum() / seen.sum()
    assert coverage > 0.7, coverage
    assert (dot & seen).sum() / seen.sum() < 0.6  # the per-pixel scatter leaves gaps
    # outside what the portrait sees: < 1% of the filled texels, all within 2 texels of it
    assert (hit & ~seen).sum() < 0.01 * hit.sum()
    assert not np.any(hit & ~ndimage.binary_dilation(seen, iterations=2))
    both = hit & seen
    psnr = 10 * np.log10(1.0 / np.mean((got[..., :3][both] - ref[..., :3][both]) ** 2))
    assert psnr > 27, psnr
    np.testing.assert_array_equal(got[..., 3][~hit], 0)
    assert np.all(got[~hit] == 0)


def test_unwrap_reproduces_texture(scene):  # noqa: F811
    """Partial-UV RGB divided by the shading equals the GT texture where it was seen."""
    t, r, tex = scene
    cam = _camera(20, 5, size=256)
    light = capture.Light(np.array([0.3, 0.4, 0.866], np.float32), 0.4, 0.6)
    out = _render(t, tex, cam, light=light)
    part = _unwrap(out, UV)
    assert part.shape == (UV, UV, 10)
    hit = part[..., 3] > 0
    assert hit.sum() > 1000 and r.mask[hit].mean() > 0.99
    shade = 0.4 + 0.6 * np.maximum(part[..., 4:7] @ np.asarray(light.direction), 0)
    # avoid texels where the clip at 1.0 loses information
    ok = hit & np.all(part[..., :3] < 0.99, -1) & (shade > 0.5)
    albedo = part[..., :3][ok] / shade[ok][:, None]
    # a texel averages bilinear samples spread over its footprint: the expected value is the
    # texture filtered by the footprint-integrated bilinear kernel (1/8, 3/4, 1/8) per axis
    k = np.array([0.125, 0.75, 0.125])
    gt = np.asarray(tex)
    gt = sum(w * np.roll(gt, d, 0) for w, d in zip(k, (-1, 0, 1), strict=True))
    gt = sum(w * np.roll(gt, d, 1) for w, d in zip(k, (-1, 0, 1), strict=True))[ok]
    psnr = 10 * np.log10(1.0 / np.mean((albedo - gt) ** 2))
    assert psnr > 30, psnr
    # unwrapped normals / positions agree with the UV normal / position maps of the mesh
    nmap = np.asarray(uvmaps.normal_map(r, jnp.asarray(t.verts), t.weld))
    assert np.median(np.sum(part[..., 4:7][hit] * nmap[hit], -1)) > 0.99
    pmap = np.asarray(uvmaps.position_map(r, jnp.asarray(t.verts)))
    assert np.median(np.linalg.norm(part[..., 7:][hit] - pmap[hit], axis=-1)) < 2e-3
