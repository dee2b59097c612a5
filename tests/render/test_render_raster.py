"""Tiled rasteriser vs the dense reference and a numpy transcription of gsplat's pixel loop;
the compositor's custom VJP vs autodiff of the reference; capacity sizing and overflow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fica_jax.render import rasterization
from fica_jax.render.composite import TileLayout, composite, composite_tiles
from fica_jax.render.rasterize import RasterCapacityWarning
from fica_jax.render.tiles import bucket_capacity


def scene(seed, n=60, w=40, h=32, c=2):
    """Random scene with Gaussians behind the camera, off-screen, very large and tiny."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n, 3)).astype(np.float32) * np.array([0.8, 0.6, 1.0], np.float32)
    means[:, 2] += 2.5
    means[0] = [0, 0, -1.0]  # behind the camera
    means[1] = [6.0, 0, 2.0]  # off-screen
    means[2] = [0.1, 0.05, 3.0]  # very large: covers the whole image
    means[3] = [-0.2, 0.1, 2.0]  # tiny
    quats = rng.normal(size=(n, 4)).astype(np.float32) * 2
    scales = np.exp(rng.uniform(-3.5, -1.5, (n, 3))).astype(np.float32)
    scales[2] = [3.0, 2.0, 0.5]
    scales[3] = [1e-4, 2e-4, 1e-4]
    opac = rng.uniform(0.05, 1.0, n).astype(np.float32)
    opac[2] = 0.5
    cols = rng.uniform(size=(n, 3)).astype(np.float32)
    vms = np.tile(np.eye(4, dtype=np.float32), (c, 1, 1))
    vms[1:, :3, 3] = [0.1, -0.05, 0.2]
    Ks = np.tile(np.array([[40, 0, w / 2], [0, 40, h / 2], [0, 0, 1]], np.float32), (c, 1, 1))
    bgs = rng.uniform(size=(c, 3)).astype(np.float32)
    return dict(means=means, quats=quats, scales=scales, opacities=opac, colors=cols,
                viewmats=vms, Ks=Ks, width=w, height=h, backgrounds=bgs)  # fmt: skip


def numpy_pixel_loop(means2d, conics, opac, colors, depths, radii, w, h, bg):
    """Direct transcription of gsplat's per-pixel compositing loop (one camera)."""
    order = [g for g in np.argsort(depths, kind="stable") if radii[g, 0] > 0 and radii[g, 1] > 0]
    img = np.zeros((h, w, colors.shape[1]))
    alpha_img = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            px, py, T = j + 0.5, i + 0.5, 1.0
            for g in order:
                a, b, c = conics[g]
                dx, dy = means2d[g, 0] - px, means2d[g, 1] - py
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                if sigma < 0:
                    continue
                alpha = min(0.999, opac[g] * np.exp(-sigma))
                if alpha < 1 / 255:
                    continue
                next_t = T * (1 - alpha)
                if next_t <= 1e-4:
                    break
                img[i, j] += colors[g] * alpha * T
                T = next_t
            img[i, j] += T * bg
            alpha_img[i, j] = 1 - T
    return img, alpha_img


@pytest.mark.heavy
def test_hand_case_single_and_stacked_gaussians():
    # one Gaussian straight ahead: at its centre pixel sigma = 0 and alpha = opacity
    means = np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 4.0]], np.float32)
    quats = np.tile(np.array([[1.0, 0, 0, 0]], np.float32), (3, 1))
    scales = np.full((3, 3), 0.05, np.float32)
    K = np.array([[[20, 0, 2.5], [0, 20, 1.5], [0, 0, 1]]], np.float32)  # centre of pixel (2, 1)
    vm = np.eye(4, dtype=np.float32)[None]
    cols = np.eye(3, dtype=np.float32)
    bg = np.array([[0.2, 0.3, 0.4]], np.float32)
    img, alpha, _ = rasterization(
        means[:1], quats[:1], scales[:1], np.array([0.7], np.float32), cols[:1], vm, K, 5, 3,
        backgrounds=bg,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(img)[0, 1, 2], [0.7 + 0.3 * 0.2, 0.3 * 0.3, 0.3 * 0.4],
                               atol=1e-6)  # fmt: skip
    # three opaque Gaussians stacked: the first takes alpha 0.999 (clamp), T = 1e-3; the second
    # would take T to 1e-6 <= 1e-4, so the pixel ends and neither it nor the third is composited
    op = np.ones(3, np.float32)
    img, alpha, _ = rasterization(means, quats, scales, op, cols, vm, K, 5, 3, backgrounds=bg)
    np.testing.assert_allclose(np.asarray(img)[0, 1, 2], [0.999 + 1e-3 * 0.2, 1e-3 * 0.3, 1e-3 * 0.4],
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.asarray(alpha)[0, 1, 2, 0], 0.999, atol=1e-6)


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_tiled_matches_numpy_pixel_loop(mode):
    s = scene(0, n=25, w=20, h=12, c=1)
    img, alpha, meta = rasterization(**s, rasterize_mode=mode, tile_size=8)
    m = jax.device_get(meta)
    ref_img, ref_alpha = numpy_pixel_loop(
        m["means2d"][0], m["conics"][0], m["opacities"][0], s["colors"], m["depths"][0],
        m["radii"][0], 20, 12, s["backgrounds"][0],
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(img)[0], ref_img, atol=1e-5)
    np.testing.assert_allclose(np.asarray(alpha)[0, ..., 0], ref_alpha, atol=1e-5)
    if mode == "antialiased":  # opacity compensation applied as in gsplat
        c = np.asarray(meta["compensations"])
        np.testing.assert_allclose(m["opacities"], s["opacities"][None] * c, rtol=1e-6)


def test_pixel_end_carries_across_chunks():
    # pixel ends inside chunk 1; chunk 2's faint Gaussian must not be composited
    px = py = jnp.array([0.5])
    m2 = jnp.array([[0.5, 0.5]] * 3)
    con = jnp.ones((3, 3)) * jnp.array([1.0, 0.0, 1.0])
    op = jnp.array([0.999, 0.999, 0.02])
    col = jnp.eye(3)
    feats = jnp.concatenate([m2, con, op[:, None], col], 1)
    for chunk in (1, 2, 3):
        acc, trans = composite(px, py, m2, con, op, col, chunk=chunk)
        np.testing.assert_allclose(np.asarray(acc[0]), [0.999, 0, 0], atol=1e-6)
        np.testing.assert_allclose(np.asarray(trans[0]), 1e-3, rtol=1e-4)
        # tiled: one 1x1 tile whose list is the three Gaussians
        lay = TileLayout(tiles_x=1, n_tiles=1, tile_size=1, chunk=chunk, tile_batch=1)
        padded = jnp.pad(feats, ((0, chunk), (0, 0)))
        acc, trans = composite_tiles(padded, jnp.array([0]), jnp.array([3]), lay)
        np.testing.assert_allclose(np.asarray(acc[0, 0]), [0.999, 0, 0], atol=1e-6)
        np.testing.assert_allclose(np.asarray(trans[0, 0]), 1e-3, rtol=1e-4)


@pytest.mark.heavy
@pytest.mark.parametrize("chunk,tile_batch", [(8, 1), (5, 3)])
def test_custom_vjp_matches_autodiff_of_reference(chunk, tile_batch):
    # 4 tiles of 4x4 pixels with lists of different lengths (one empty) in one slot array;
    # opaque entries end pixels, some alphas clamp at 0.999, faint ones are skipped
    rng = np.random.default_rng(0)
    ts, lens = 4, [37, 0, 12, 25]
    n = sum(lens)
    m2 = rng.uniform(-1, 9, (n, 2)).astype(np.float32)
    a = rng.uniform(0.03, 0.5, n)
    c = rng.uniform(0.03, 0.5, n)
    b = rng.uniform(-0.5, 0.5, n) * np.sqrt(a * c)
    con = np.stack([a, b, c], 1).astype(np.float32)
    op = rng.choice([0.003, 0.3, 0.7, 0.9995], n, p=[0.1, 0.3, 0.4, 0.2]).astype(np.float32)
    col = rng.uniform(size=(n, 4)).astype(np.float32)
    feats = jnp.asarray(np.concatenate([m2, con, op[:, None], col], 1))
    start = jnp.asarray(np.cumsum([0] + lens[:-1]), jnp.int32)
    count = jnp.asarray(lens, jnp.int32)
    lay = TileLayout(tiles_x=2, n_tiles=4, tile_size=ts, chunk=chunk, tile_batch=tile_batch)
    v_acc = jnp.asarray(rng.normal(size=(4, ts * ts, 4)).astype(np.float32))
    v_t = jnp.asarray(rng.normal(size=(4, ts * ts)).astype(np.float32))

    def tiled(f):
        acc, trans = composite_tiles(jnp.pad(f, ((0, chunk), (0, 0))), start, count, lay)
        return jnp.sum(acc * v_acc) + jnp.sum(trans * v_t), (acc, trans)

    def reference(f):
        accs, transs = [], []
        for t, (s0, k) in enumerate(zip(np.asarray(start), lens, strict=True)):
            ly, lx = np.divmod(np.arange(ts * ts), ts)
            px = jnp.asarray(lx + (t % 2) * ts + 0.5, jnp.float32)
            py = jnp.asarray(ly + (t // 2) * ts + 0.5, jnp.float32)
            g = f[s0 : s0 + max(k, 1)] * (1.0 if k else 0.0)
            acc, trans = composite(px, py, g[:, :2], g[:, 2:5], g[:, 5], g[:, 6:], chunk=7)
            accs.append(acc)
            transs.append(trans)
        acc, trans = jnp.stack(accs), jnp.stack(transs)
        return jnp.sum(acc * v_acc) + jnp.sum(trans * v_t), (acc, trans)

    (gt, (at, tt)) = jax.jit(jax.grad(tiled, has_aux=True))(feats)
    (gr, (ar, tr)) = jax.jit(jax.grad(reference, has_aux=True))(feats)
    np.testing.assert_allclose(np.asarray(at), np.asarray(ar), atol=1e-5)
    np.testing.assert_allclose(np.asarray(tt), np.asarray(tr), atol=1e-5)
    assert (np.asarray(tt) < 0.01).any() and (np.asarray(tt) > 0.5).any()  # ended and open
    gt, gr = np.asarray(gt), np.asarray(gr)
    np.testing.assert_allclose(gt, gr, rtol=1e-3, atol=1e-4 * np.abs(gr).max())
    assert np.abs(gr).sum() > 0


# antialiased only rescales opacities (checked against the pixel loop above): slow run only;
# under jit the default capacity applies, and an overflow would fail the test (warning -> error)
@pytest.mark.heavy
@pytest.mark.filterwarnings("error::fica_jax.render.rasterize.RasterCapacityWarning")
@pytest.mark.parametrize("mode", ["classic", pytest.param("antialiased", marks=pytest.mark.slow)])
def test_tiled_equals_dense_values_and_gradients(mode):
    s = scene(1)
    diff = ("means", "quats", "scales", "opacities", "colors", "backgrounds")
    rng = np.random.default_rng(5)
    w_img = jnp.asarray(rng.normal(size=(2, s["height"], s["width"], 4)).astype(np.float32))

    def loss(dense, *args):
        kw = dict(s) | dict(zip(diff, args, strict=True))
        img, alpha, _ = rasterization(**kw, rasterize_mode=mode, render_mode="RGB+D",
                                      dense=dense, tile_size=8, chunk=16)  # fmt: skip
        return jnp.sum(img * w_img) + jnp.sum(alpha[..., 0] * w_img[..., 0]), (img, alpha)

    args = [s[k] for k in diff]
    g = jax.jit(jax.grad(loss, argnums=tuple(range(1, 7)), has_aux=True), static_argnums=0)
    (gt, (it, at)), (gd, (idn, ad)) = g(False, *args), g(True, *args)
    np.testing.assert_allclose(np.asarray(it), np.asarray(idn), atol=1e-4)
    np.testing.assert_allclose(np.asarray(at), np.asarray(ad), atol=1e-4)
    for name, a, b in zip(diff, gt, gd, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max(), err_msg=name)
    assert np.abs(np.asarray(gt[0])[2]).sum() > 0  # the huge Gaussian gets gradient
    assert np.abs(np.asarray(gt[0])[0]).sum() == 0  # the one behind the camera does not


def cluster_scene(seed, n=3000, w=32, h=32):
    """A few thousand faint, small Gaussians clustered into one 16 px tile, a few big ones."""
    rng = np.random.default_rng(seed)
    f = 40.0
    depth = rng.uniform(2.0, 4.0, n).astype(np.float32)
    centre = rng.uniform(2.0, 14.0, (n, 2)).astype(np.float32)  # inside tile (0, 0)
    centre[:20] = rng.uniform(0, w, (20, 2))  # spill into the other tiles
    xy = (centre - np.array([w / 2, h / 2], np.float32)) * depth[:, None] / f
    means = np.concatenate([xy, depth[:, None]], 1)
    quats = rng.normal(size=(n, 4)).astype(np.float32)
    scales = (depth[:, None] / f * rng.uniform(0.4, 1.5, (n, 3))).astype(np.float32)
    scales[:20] *= 8
    opac = rng.uniform(0.004, 0.02, n).astype(np.float32)  # faint: pixels stay open
    cols = rng.uniform(size=(n, 3)).astype(np.float32)
    vms = np.eye(4, dtype=np.float32)[None]
    Ks = np.array([[[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]]], np.float32)
    bgs = rng.uniform(size=(1, 3)).astype(np.float32)
    return dict(means=means, quats=quats, scales=scales, opacities=opac, colors=cols,
                viewmats=vms, Ks=Ks, width=w, height=h, backgrounds=bgs)  # fmt: skip


@pytest.mark.heavy
@pytest.mark.parametrize("mode", ["RGB", "ED"])
def test_dense_tile_exact_with_default_arguments(mode):
    # > 2000 Gaussians in one tile, no capacity passed: eager jax.grad sizes the slots itself
    s = cluster_scene(7)
    diff = ("means", "quats", "scales", "opacities", "colors", "backgrounds")
    d = 3 if mode == "RGB" else 1
    w_img = jnp.asarray(np.random.default_rng(8).normal(size=(1, 32, 32, d)).astype(np.float32))
    metas = {}

    def loss(dense, *args):
        kw = dict(s) | dict(zip(diff, args, strict=True))
        img, alpha, meta = rasterization(**kw, render_mode=mode, dense=dense)
        metas[dense] = meta
        return jnp.sum(img * w_img) + jnp.sum(alpha[..., 0] * w_img[..., 0]), (img, alpha)

    args = [s[k] for k in diff]
    gt, (it, at) = jax.grad(loss, argnums=tuple(range(1, 7)), has_aux=True)(False, *args)
    grad_dense = jax.jit(jax.grad(loss, argnums=tuple(range(1, 7)), has_aux=True), static_argnums=0)
    gd, (idn, ad) = grad_dense(True, *args)
    m = metas[False]
    assert int(m["max_tile_count"][0]) > 2000
    assert int(m["isect_overflow"][0]) == 0
    assert m["isect_capacity"] == bucket_capacity(int(m["n_isects"][0]))
    np.testing.assert_allclose(np.asarray(it), np.asarray(idn), atol=1e-4)
    np.testing.assert_allclose(np.asarray(at), np.asarray(ad), atol=1e-4)
    assert np.asarray(at).max() > 0.5  # the tile is well covered, not blank
    for name, a, b in zip(diff, gt, gd, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if mode == "ED" and name in ("colors", "backgrounds"):
            continue  # no colour channel in ED
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max(), err_msg=name)


def test_eager_call_sizes_capacity_from_count():
    s = scene(2, n=80)
    _, _, meta = rasterization(**s, tile_size=8)
    n = int(np.asarray(meta["n_isects"]).max())
    assert meta["isect_capacity"] == bucket_capacity(n) >= n
    assert int(np.asarray(meta["isect_overflow"]).sum()) == 0
    assert bucket_capacity(5000) == 8192 and bucket_capacity(8100) == 16384  # 1/64 slack


def test_overflow_under_jit_is_counted_and_warned():
    s = scene(2, n=80)
    imgs = {k: jnp.asarray(v) for k, v in s.items() if k not in ("width", "height")}
    run = jax.jit(lambda x, cap: rasterization(**x, width=40, height=32, tile_size=8,
                                               isect_capacity=cap)[2], static_argnums=1)  # fmt: skip
    with pytest.warns(RasterCapacityWarning, match="isect_capacity is too small"):
        meta = jax.block_until_ready(run(imgs, 16))
        jax.effects_barrier()
    np.testing.assert_array_equal(
        np.asarray(meta["isect_overflow"]), np.asarray(meta["n_isects"]) - 16
    )
    # the default capacity under jit (no count pass possible) fits this scene: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RasterCapacityWarning)
        meta = jax.block_until_ready(run(imgs, None))
        jax.effects_barrier()
    assert int(np.asarray(meta["isect_overflow"]).sum()) == 0


@pytest.mark.heavy
def test_render_modes_and_background():
    s = scene(3)
    rgbd, alpha, _ = rasterization(**s, render_mode="RGB+D")
    ed, _, _ = rasterization(**s, render_mode="ED")
    nobg, _, _ = rasterization(**(s | dict(backgrounds=None)))
    d, a = np.asarray(rgbd[..., 3:]), np.asarray(alpha)
    np.testing.assert_allclose(np.asarray(ed)[a > 0.1], (np.asarray(d) / a)[a > 0.1], rtol=1e-4)
    bg = s["backgrounds"][:, None, None, :]
    np.testing.assert_allclose(np.asarray(rgbd[..., :3]), np.asarray(nobg) + (1 - a) * bg,
                               atol=1e-5)  # fmt: skip
    assert ed.shape == a.shape and rgbd.shape[-1] == 4
    assert d.max() > 1.0  # accumulated depth, not a colour


@pytest.mark.heavy
def test_vmap_over_avatars_matches_loop():
    scenes = [scene(10 + i, n=30, w=24, h=16, c=1) for i in range(3)]
    stack = {
        k: np.stack([sc[k] for sc in scenes]) for k in scenes[0] if k not in ("width", "height")
    }

    def one(x):
        return rasterization(**x, width=24, height=16, tile_size=8)[0]

    out = jax.jit(jax.vmap(one))(stack)
    for i, sc in enumerate(scenes):
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(rasterization(**sc, tile_size=8)[0]),
                                   atol=1e-6)  # fmt: skip


@pytest.mark.heavy
def test_sharded_batch_over_data_axis():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fica_jax.sharding import DATA, make_mesh

    mesh = make_mesh({DATA: 4, "fsdp": 2})
    scenes = [scene(20 + i, n=24, w=16, h=16, c=1) for i in range(4)]
    stack = {
        k: np.stack([sc[k] for sc in scenes]) for k in scenes[0] if k not in ("width", "height")
    }
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P(DATA, *([None] * (x.ndim - 1)))))
    sharded = jax.tree.map(shard, stack)

    def step(x):
        img, alpha, _ = jax.vmap(lambda y: rasterization(**y, width=16, height=16, tile_size=8))(x)
        return img, jnp.mean(jax.grad(lambda m: jax.vmap(
            lambda y, mm: rasterization(**(y | {"means": mm}), width=16, height=16, tile_size=8)[0].sum()
        )(x, m).sum())(x["means"]) ** 2)  # fmt: skip

    img, gsq = jax.jit(step)(sharded)
    assert img.sharding.spec[0] == DATA  # stays split over the batch
    ref_img, ref_gsq = jax.jit(step)(stack)
    np.testing.assert_allclose(np.asarray(img), np.asarray(ref_img), atol=1e-6)
    np.testing.assert_allclose(float(gsq), float(ref_gsq), rtol=1e-5)


def _has_cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs CUDA: gsplat.rasterization runs CUDA kernels")
def test_matches_gsplat_cuda_rasterization():
    import gsplat
    import torch

    s = scene(4, n=500, w=64, h=48, c=2)
    t = lambda x: torch.from_numpy(np.array(x)).cuda()
    ref_img, ref_alpha, _ = gsplat.rasterization(
        t(s["means"]), t(s["quats"]), t(s["scales"]), t(s["opacities"]), t(s["colors"]),
        t(s["viewmats"]), t(s["Ks"]), s["width"], s["height"], backgrounds=t(s["backgrounds"]),
        packed=False,  # gsplat's packed default takes one background for all cameras
    )  # fmt: skip
    img, alpha, meta = rasterization(**s)
    assert int(np.asarray(meta["isect_overflow"]).sum()) == 0
    diff = np.abs(np.asarray(img) - ref_img.cpu().numpy())
    print(f"ours vs gsplat CUDA: image max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
    np.testing.assert_allclose(np.asarray(img), ref_img.cpu().numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(alpha), ref_alpha.cpu().numpy(), atol=1e-4)
