"""Projection stage vs gsplat 1.5.3's own pure-torch reference (`_fully_fused_projection`)."""

import numpy as np
import pytest
import torch

from fica_jax.render.project import covariance, project, quat_to_rotmat

_torch_impl = pytest.importorskip("gsplat.cuda._torch_impl")


def random_scene(seed, n=400, w=96, h=64):
    rng = np.random.default_rng(seed)
    # a spread that includes Gaussians behind the camera, off-screen, huge and tiny
    means = rng.normal(size=(n, 3)).astype(np.float32) * np.array([2.0, 1.5, 2.0], np.float32)
    means[:, 2] += 2.5
    quats = rng.normal(size=(n, 4)).astype(np.float32) * rng.uniform(0.5, 2.0, (n, 1))
    # anisotropy up to e^5: needles much thinner make the float32 2D covariance so ill-conditioned
    # that torch's and our einsum orders give conics ~1e-3 apart (seen at e^6.5)
    scales = np.exp(rng.uniform(-4.5, 0.5, (n, 3))).astype(np.float32)
    K = np.array([[80, 0, 50], [0, 75, 30], [0, 0, 1]], np.float32)
    a = rng.normal(size=3) * 0.2
    c, s = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    vm = np.eye(4, dtype=np.float32)
    vm[:3, :3] = rx @ ry
    vm[:3, 3] = rng.normal(size=3) * 0.3
    return means, quats, scales, vm, K, w, h


def test_rotmat_and_covariance_match_gsplat():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(50, 4)).astype(np.float32) * 3
    s = np.exp(rng.normal(size=(50, 3))).astype(np.float32)
    ref_r = _torch_impl._quat_to_rotmat(torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(np.asarray(quat_to_rotmat(q)), ref_r, rtol=1e-5, atol=1e-6)
    ref_c, _ = _torch_impl._quat_scale_to_covar_preci(
        torch.from_numpy(q), torch.from_numpy(s), compute_preci=False
    )
    np.testing.assert_allclose(np.asarray(covariance(q, s)), ref_c.numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_matches_gsplat_torch(seed):
    means, quats, scales, vm, K, w, h = random_scene(seed)
    covars = np.asarray(covariance(quats, scales))
    t = lambda x: torch.from_numpy(np.array(x, np.float32))
    radii_t, m2_t, d_t, con_t, comp_t = _torch_impl._fully_fused_projection(
        t(means), t(covars), t(vm[None]), t(K[None]), w, h, eps2d=0.3, calc_compensations=True
    )
    p = project(means, covars, vm, K, w, h, eps2d=0.3)
    radii = np.asarray(p.radii)
    ref_radii = radii_t[0].numpy()
    kept = ref_radii[:, 0] > 0
    # the scene must exercise every branch: visible, behind the camera, off-screen
    assert 20 < kept.sum() < len(kept) - 20
    assert (means @ vm[:3, :3].T + vm[:3, 3])[:, 2].min() < 0
    np.testing.assert_array_equal(radii[:, 0] > 0, kept)  # same culled mask
    np.testing.assert_array_equal(radii[kept], ref_radii[kept])
    np.testing.assert_allclose(np.asarray(p.means2d)[kept], m2_t[0].numpy()[kept], rtol=1e-4,
                               atol=1e-3)  # fmt: skip
    np.testing.assert_allclose(np.asarray(p.depths)[kept], d_t[0].numpy()[kept], rtol=1e-4)
    # conics (the inverse 2D covariance) against gsplat's code run in float64: a thin Gaussian's
    # inverse loses float32 digits in both implementations (seed 1, AVX-512 host: gsplat's own
    # float32 run is off by 1.0e-4 of the row's largest entry, ours by 4.3e-4)
    f64 = lambda x: torch.from_numpy(np.array(x, np.float64))
    con64 = _torch_impl._fully_fused_projection(
        f64(means), f64(covars), f64(vm[None]), f64(K[None]), w, h, eps2d=0.3
    )[3][0].numpy()[kept]
    con, ref_con = np.asarray(p.conics)[kept], con_t[0].numpy()[kept]
    scale = np.broadcast_to(np.abs(con64).max(axis=1, keepdims=True), con64.shape)
    np.testing.assert_array_less(np.abs(ref_con - con64), 2e-4 * scale)  # gsplat's float32
    np.testing.assert_array_less(np.abs(con - con64), 5e-4 * scale)
    # det(cov2d) before eps2d is a float32 difference of near-equal products for needle-thin
    # Gaussians, so the compensation agrees to ~1e-3 only (einsum order differs from torch)
    np.testing.assert_allclose(np.asarray(p.compensations)[kept], comp_t[0].numpy()[kept],
                               rtol=3e-3, atol=1e-5)  # fmt: skip


def test_projection_gradients_finite_for_culled():
    import jax
    import jax.numpy as jnp

    means, quats, scales, vm, K, w, h = random_scene(3, n=100)

    def loss(m, q, s):
        p = project(m, covariance(q, s), vm, K, w, h)
        live = p.radii[:, 0] > 0
        return jnp.sum(jnp.where(live[:, None], p.conics, 0)) + jnp.sum(
            jnp.where(live[:, None], p.means2d, 0)
        )

    grads = jax.grad(loss, argnums=(0, 1, 2))(means, quats, scales)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.abs(np.asarray(grads[0])).sum() > 0
