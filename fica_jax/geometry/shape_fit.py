"""The head's shape from the portrait's landmarks, in the training identities' shape space (ours).

FiCA's DiT draws the geometry map from the image embedding and the partial maps. At the demo's
scale (21 training identities) that geometry is no better than the training mean shape (2.9 vs
2.2 mm L1 on the held-out identities, `docs/architecture.md`), and on the dome frames the
geometry costs more than the texture: the ground-truth texture on the DiT's geometry renders
1.8 dB under the ground-truth maps. What the portrait does pin is where its landmarks are. A
face tracker (FiCA's EMOCA / SMIRK stage) gives the portrait's camera, expression and 2D
landmarks; this module moves the geometry so that its landmarks project onto them.

The unknowns are the coordinates of the geometry in the training identities' shape space
(`shape_space`: the principal components of their neutral geometry maps, at most
`max_components`, with their standard deviations). `fit_landmarks` solves

    min_c  sum_l v_l |pi(m_l + B_l c + o_l) - k_l|^2 / (SIGMA * size)^2 + PRIOR * sum_k (c_k / sd_k)^2

by Gauss-Newton (ITERS steps from the mean shape, c = 0): m_l, B_l are the mean map and the
components sampled at landmark l's UV coordinates, o_l the portrait expression's UV offset
there, pi the portrait's camera, k_l the landmark in pixels and v_l its visibility; `size` is
the portrait's side. It is closed-form per step, deterministic and takes milliseconds: no
test-time optimisation of the avatar. The result replaces the input geometry's own coordinates
in that space (`replace_coordinates`); of what lies outside it, the input's detail that the
space cannot express, a share `keep` is kept. Where the generator's geometry is no better than
the training mean, as at the demo's scale, that residual is noise and `keep` is 0: the fitted
shape replaces the geometry. Where it carries real detail (a DiT trained on thousands of
identities), keeping it stops a shape space of few components from flattening it. The share is
the refiner config's `model.shape_fit_residual` (tiny 0, paper 1; `RESIDUAL` for exports
without it).

PRIOR and the share were chosen on the demo's 21 training identities (seed 0), each fitted in
the shape space of the other 20 from its own DiT sample (one per identity), by the ground-truth
texture on the fitted geometry rendered through the UPM (dome-frame face PSNR; the ground-truth
geometry gives 17.54 dB, the mean shape 16.34, the DiT's 16.86), the geometry's RMS error and
how far its visible texels land from where the ground truth puts them in the portrait (px at
64 px; what the visible-texel transfer needs):

    PRIOR        0.03   0.1    0.3    1      3
    keep 1 (dB)  17.40  17.38  17.33  17.27  17.17
    keep 0 (dB)  17.52  17.48  17.39  17.32  17.21
    keep 1 (mm)  5.15   4.80   4.70   4.81   5.05
    keep 0 (mm)  4.31   3.92   3.80   3.96   4.25
    keep 0 (px)  0.435  0.408  0.418  0.468  0.528

PRIOR 0.1 with keep 0: within 0.05 dB of the best render, the best registration and near the
best RMS error. (The previous choice, PRIOR 3 with keep 1, was made on 7 of these identities by
the render alone.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.geometry.uvmaps import sample_uv_map

SIGMA = 1.0 / 64  # a landmark's error scale as a fraction of the portrait's side (1 px at 64)
PRIOR = 0.1  # weight of the shape prior against the landmark residuals
RESIDUAL = 0.0  # share of the input geometry's part outside the space that a fit keeps
ITERS = 8  # Gauss-Newton steps
MIN_LANDMARKS = 8  # fewer visible landmarks than this: no fit (the input geometry stays)
# The refiner export's shape space: from at most this many training identities' geometry maps
# (held in memory for one SVD: 3 GB at 512^2 texels), this many components.
SHAPE_RECORDS, SHAPE_COMPONENTS = 1024, 32


def shape_space(geometries: np.ndarray, mask: np.ndarray, max_components: int = 32) -> dict:
    """Neutral geometry maps [N, R, R, 3] of the training identities and the UV mask [R, R] ->
    {"mean" [R, R, 3], "basis" [K, R, R, 3] (orthonormal over the masked texels, zero off
    them), "sd" [K] (the identities' standard deviation along each)}, K <= min(N - 1,
    max_components), components of negligible variance dropped."""
    g = np.asarray(geometries, np.float32)  # float32: [N, R^2 3] is 3 GB at N 1024, R 512
    m = np.asarray(mask) > 0
    mean = (g.mean(0, dtype=np.float64) * m[..., None]).astype(np.float32)
    x = (g - mean)[:, m].reshape(len(g), -1)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = int(min(len(g) - 1, max_components, np.sum(s > 1e-6 * max(s[0], 1e-30))))
    basis = np.zeros((k,) + mean.shape)
    basis[:, m] = vt[:k].reshape(k, -1, 3)
    sd = s[:k] / np.sqrt(max(len(g) - 1, 1))
    f32 = lambda a: np.asarray(a, np.float32)
    return {"mean": f32(mean), "basis": f32(basis), "sd": f32(sd)}


def coordinates(space: dict, geometry: np.ndarray) -> np.ndarray:
    """A geometry map's coordinates [K] in `space` (its projection onto the basis)."""
    d = np.asarray(geometry, np.float64) - space["mean"]
    return np.einsum("krsc,rsc->k", np.asarray(space["basis"], np.float64), d)


def replace_coordinates(space: dict, geometry: np.ndarray, c: np.ndarray, keep: float = 1.0
                        ) -> np.ndarray:  # fmt: skip
    """`geometry` with its coordinates in `space` replaced by c [K], and `keep` x the rest of it
    (what lies outside the space): 1 keeps it whole, 0 gives the space's shape mean + basis . c."""
    g = np.asarray(geometry, np.float64)
    inside = space["mean"] + np.einsum("k,krsc->rsc", coordinates(space, g), space["basis"])
    fitted = space["mean"] + np.einsum("k,krsc->rsc", np.asarray(c, np.float64), space["basis"])
    return np.asarray(fitted + keep * (g - inside), np.float32)


@jax.jit
def _gauss_newton(c0, mean_l, basis_l, kpts, visible, K, viewmat, scale, prior_w):
    """ITERS Gauss-Newton steps on the energy in the module docstring."""

    def residual(c):
        x = mean_l + jnp.einsum("k,klc->lc", c, basis_l)
        pc = x @ viewmat[:3, :3].T + viewmat[:3, 3]
        uvw = pc @ K.T
        px = uvw[:, :2] / jnp.where(jnp.abs(uvw[:, 2:]) > 1e-9, uvw[:, 2:], 1e-9)
        return ((px - kpts) * visible[:, None] / scale).ravel()

    def step(c, _):
        r, jac = residual(c), jax.jacfwd(residual)(c)
        a = jac.T @ jac + jnp.diag(prior_w)
        return c - jnp.linalg.solve(a, jac.T @ r + prior_w * c), None

    c, _ = jax.lax.scan(step, c0, None, length=ITERS)
    return c, jnp.sqrt(jnp.sum(residual(c) ** 2) / jnp.maximum(visible.sum(), 1.0))


def fit_landmarks(
    space: dict,
    offset: np.ndarray,  # [R, R, 3] the portrait expression's UV offset (posed - neutral)
    landmark_uv: np.ndarray,  # [L, 2] UV coordinates of the landmarks on the template
    kpts: np.ndarray,  # [L, 2] the portrait's landmarks, pixels (x, y)
    visible: np.ndarray,  # [L] bool
    K: np.ndarray,  # [3, 3] at the portrait's size
    viewmat: np.ndarray,  # [4, 4] head -> camera
    size: int,  # the portrait's side, pixels
    prior: float = PRIOR,
) -> tuple[np.ndarray, dict] | None:
    """-> (coordinates c [K] in `space`, {"landmarks": used, "rms_px": residual after}), or None
    with fewer than MIN_LANDMARKS visible landmarks or an empty space."""
    vis = np.asarray(visible, bool) & np.all(np.isfinite(kpts), -1)
    n = len(space["sd"])
    if vis.sum() < MIN_LANDMARKS or n == 0:
        return None
    uv = jnp.asarray(landmark_uv, jnp.float32)
    mean_l = sample_uv_map(jnp.asarray(space["mean"] + offset), uv)
    basis_l = jax.vmap(lambda b: sample_uv_map(b, uv))(jnp.asarray(space["basis"]))
    prior_w = prior / np.maximum(np.asarray(space["sd"], np.float32), 1e-12) ** 2
    c, rms = _gauss_newton(jnp.zeros(n), mean_l, basis_l,
                           jnp.asarray(np.where(vis[:, None], kpts, 0.0), jnp.float32),
                           jnp.asarray(vis, jnp.float32), jnp.asarray(K, jnp.float32),
                           jnp.asarray(viewmat, jnp.float32), jnp.float32(SIGMA * size),
                           jnp.asarray(prior_w, jnp.float32))  # fmt: skip
    return np.asarray(c), {"landmarks": int(vis.sum()), "rms_px": float(rms) * SIGMA * size}
