"""Surfel (mesh-proxy) rendering: vs the capture renderer, silhouette gradients, keypoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fica_jax.render.surfels import project_keypoints, render_surfels, surfel_gaussians


def plane(r=16, size=0.6, z=2.0):
    """UV position map of a square plane facing the camera, and a checker texture."""
    u = (np.arange(r) + 0.5) / r - 0.5
    xx, yy = np.meshgrid(u * size, u * size)
    pos = np.stack([xx, yy, np.full_like(xx, z)], -1).astype(np.float32)
    tex = np.zeros((r, r, 3), np.float32)
    tex[..., 0] = (np.arange(r)[None, :] // 4) % 2
    tex[..., 1] = 0.5
    return tex, pos


CAM_K = np.array([[[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]], np.float32)
CAM_VM = np.eye(4, dtype=np.float32)[None]


def test_surfel_covariance_is_flat_and_tangent():
    tex, pos = plane()
    g = surfel_gaussians(tex, pos)
    ev, evec = np.linalg.eigh(np.asarray(g["covars"]))
    # thinnest axis along the plane normal (z), in-plane std = footprint x texel step
    np.testing.assert_allclose(np.abs(evec[:, 2, 0]), 1.0, atol=1e-5)
    step = 0.6 / 16
    np.testing.assert_allclose(np.sqrt(ev[:, 1:]), 0.5 * step, rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(ev[:, 0]), 0.1 * step, rtol=1e-3)  # thickness


@pytest.mark.heavy
def test_surfel_plane_silhouette_and_keypoints():
    tex, pos = plane()
    out = render_surfels(tex, pos, CAM_VM, CAM_K, 32, 32, landmark_uvs=np.array([[0.5, 0.5]]),
                         landmarks=None)  # fmt: skip
    a = np.asarray(out["alpha"][0])
    # the plane spans x, y in [-0.3, 0.3] at z = 2 -> pixels 16 +- 6: opaque inside (texels of
    # ~0.75 px at footprint 0.5 leave > 97% coverage between them), empty outside
    assert (
        a[12:20, 12:20].min() > 0.97
        and a[12:20, 12:20].mean() > 0.985
        and a[:8].max() < 1e-3
        and a[:, 25:].max() < 1e-3
    )
    np.testing.assert_allclose(np.asarray(out["keypoints"])[0, 0], [16.0, 16.0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["depth"])[0, 16, 16], 2.0, rtol=1e-4)
    kp = project_keypoints(jnp.array([[0.3, -0.3, 2.0]]), CAM_VM, CAM_K)
    np.testing.assert_allclose(np.asarray(kp)[0, 0], [22.0, 10.0], atol=1e-5)


def test_mask_gradient_moves_silhouette_towards_target():
    tex, pos = plane()
    target = render_surfels(tex, pos + np.array([0.08, 0.0, 0.0], np.float32), CAM_VM, CAM_K,
                            32, 32)["alpha"]  # fmt: skip

    @jax.jit
    def loss_and_grad(offset):
        def loss(o):
            out = render_surfels(tex, pos + o, CAM_VM, CAM_K, 32, 32)
            return jnp.mean(jnp.abs(out["alpha"] - target))

        return jax.value_and_grad(loss)(offset)

    offset = jnp.zeros(3)
    losses = []
    for _ in range(25):
        loss, g = loss_and_grad(offset)
        losses.append(float(loss))
        offset = offset - 0.02 * g / (jnp.linalg.norm(g) + 1e-12)  # normalised steps
    assert losses[-1] < 0.3 * losses[0], losses
    assert 0.05 < float(offset[0]) < 0.11, offset  # silhouette moved right, towards the target
    assert abs(float(offset[1])) < 0.02


def test_texture_and_geometry_gradients_reach_silhouette():
    tex, pos = plane()

    def loss(t, p):
        out = render_surfels(t, p, CAM_VM, CAM_K, 32, 32)
        return jnp.sum(out["image"]) + jnp.sum(out["alpha"][:, :, 9])  # column at the left edge

    gt, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(tex, pos)
    gt, gp = np.asarray(gt), np.asarray(gp)
    assert np.isfinite(gt).all() and np.isfinite(gp).all()
    assert (gt[..., 0] > 0).all()  # every texel is visible
    assert np.abs(gp[:, 0, 0]).max() > 0  # edge texels' x position drives the edge column


@pytest.fixture(scope="module")
def synth_record():
    gen = pytest.importorskip("data_pipelines.synthetic.generator")
    # the capture is rendered 4x larger and box-filtered: an anti-aliased reference image
    cfg = gen.SynthConfig(uv_resolution=128, image_size=512, n_frames=2, template_resolution=32)
    return gen.make_identity(0, cfg, seed=0)


@pytest.mark.heavy
def test_surfels_reproduce_capture_renderer(synth_record):
    from fica_jax.geometry.uvmaps import sample_uv_map

    rec, s, h = synth_record, 4, 128
    tex = rec["uv_texture"].astype(np.float32) / 255
    psnrs = []
    for v in range(rec["view_K"].shape[0]):
        # the capture renderer's unshaded image is sample_uv_map(texture, per-pixel uv) on its mask
        fg_hi = rec["view_mask"][v] > 0
        uv = jnp.asarray(rec["view_uv"][v].astype(np.float32))
        albedo = np.asarray(sample_uv_map(jnp.asarray(tex), uv)) * fg_hi[..., None]
        cover = fg_hi.reshape(h, s, h, s).mean((1, 3))
        ref = albedo.reshape(h, s, h, s, 3).mean((1, 3)) / np.maximum(cover, 1e-6)[..., None]
        K = rec["view_K"][v : v + 1].copy()
        K[:, :2] /= s
        out = render_surfels(tex, rec["view_uv_geometry"][v].astype(np.float32),
                             rec["view_viewmat"][v : v + 1], K, h, h, mask=rec["uv_mask"])  # fmt: skip
        img, a = np.asarray(out["image"][0]), np.asarray(out["alpha"][0])
        fg = cover > 0.999  # pixels fully on the head
        psnrs.append(-10 * np.log10(np.mean((img - ref)[fg] ** 2)))
        assert np.abs(a - cover).mean() < 0.03  # silhouettes agree too
    assert min(psnrs) > 30.0, psnrs


@pytest.mark.heavy
def test_gradients_are_finite_where_a_texel_has_a_zero_tangent():
    """Texels at one point (a welded seam, a dilated border: the synthetic 64^2 UV maps have
    them) give a zero tangent and a zero normal: the plain norm's gradient there is 0 / 0, and
    that one NaN reached every refiner parameter in `fica demo` at 64^2 UV maps. `safe_norm`
    keeps it finite (0 at 0)."""
    from fica_jax.render.surfels import normal_maps, safe_norm

    g = jax.grad(lambda v: safe_norm(v).sum())(jnp.zeros((4, 3)))
    np.testing.assert_array_equal(g, 0.0)
    np.testing.assert_allclose(safe_norm(jnp.array([[3.0, 4.0, 0.0]])), [[5.0]])
    r = 8
    u, v = np.meshgrid(np.linspace(-0.05, 0.05, r), np.linspace(-0.05, 0.05, r))
    pos = np.stack([u, v, 0.3 + 0.2 * u * u], -1)
    pos[3, 2:5] = pos[3, 3]  # three texels of a row at one point: zero tangent along u
    pos[2:5, 3] = pos[3, 3]  # and along v
    pos = jnp.asarray(pos, jnp.float32)
    mask = np.zeros((r, r), bool)
    mask[1:6, 1:6] = True
    tex = jnp.full((r, r, 3), 0.5)

    def loss(p):
        gs = surfel_gaussians(tex, p, mask)
        nrm = normal_maps(p[None], jnp.asarray(mask, jnp.float32)[None])
        return jnp.sum(gs["covars"]) * 1e3 + jnp.sum(nrm)

    grad = jax.grad(loss)(pos)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad[1, 1]).max()) > 0  # the rest of the surface keeps its gradient
