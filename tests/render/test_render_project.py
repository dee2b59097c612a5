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
    # Conics (the inverse 2D covariance) and compensations against gsplat's code run in float64,
    # never against its float32 run: how a float32 run rounds depends on the host CPU's
    # instruction set (an AVX-512 Xeon and an AMD EPYC differ), ours and gsplat's alike. The bound
    # is float32's forward error for inverting a 2x2 matrix of condition number k: a few eps * k
    # of the row's largest entry; 32 eps k leaves 5x margin over the worst seen on either host
    # kind (6.5 eps k, seed 2) while a wrong formula is off by O(1).
    f64 = lambda x: torch.from_numpy(np.array(x, np.float64))
    ref64 = _torch_impl._fully_fused_projection(
        f64(means), f64(covars), f64(vm[None]), f64(K[None]), w, h, eps2d=0.3,
        calc_compensations=True,
    )  # fmt: skip
    con64, comp64 = ref64[3][0].numpy()[kept], ref64[4][0].numpy()[kept]
    a, b, c = con64.T
    half_tr, disc = (a + c) / 2, np.sqrt(np.maximum(((a - c) / 2) ** 2 + b * b, 0))
    kappa = (half_tr + disc) / (half_tr - disc)  # the 2D covariance's condition number
    tol = 32 * np.finfo(np.float32).eps * kappa
    err = np.abs(np.asarray(p.conics)[kept] - con64).max(axis=1) / np.abs(con64).max(axis=1)
    np.testing.assert_array_less(err, tol)
    # det(cov2d) before eps2d is a float32 difference of near-equal products for needle-thin
    # Gaussians: the same conditioning bounds the compensation's relative error
    comp = np.asarray(p.compensations)[kept]
    np.testing.assert_array_less(np.abs(comp - comp64) / comp64, tol)


@pytest.mark.heavy
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
