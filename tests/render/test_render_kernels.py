"""The Pallas compositing kernels (render/kernels.py) against the XLA path: both kernels in
interpret mode, values and every gradient, on the hard scenes; the path `backend` resolves to;
the parallel (bucketed) XLA path; the Triton kernel's lowering for CUDA; on a GPU, the compiled
kernel (marked gpu). The TPU kernel compiling inside the UPM train step for v5p is in
tests/plan/test_render_cost.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fica_jax.errors import UserError
from fica_jax.render import kernels, rasterization
from fica_jax.render.composite import TileLayout, composite_tiles
from fica_jax.render.rasterize import RasterOptions, resolve, target_platform
from tests.render.test_render_raster import cluster_scene, scene

DIFF = ("means", "quats", "scales", "opacities", "colors", "backgrounds")


def hand_lists(seed=0, ts=4, lens=(37, 0, 12, 25)):
    """4 tiles of ts x ts pixels with lists of different lengths (one empty) in one slot array:
    opaque entries end pixels, some alphas clamp at 0.999, faint ones are skipped."""
    rng = np.random.default_rng(seed)
    n = sum(lens)
    m2 = rng.uniform(-1, 2 * ts + 1, (n, 2)).astype(np.float32)
    a, c = rng.uniform(0.03, 0.5, n), rng.uniform(0.03, 0.5, n)
    b = rng.uniform(-0.5, 0.5, n) * np.sqrt(a * c)
    con = np.stack([a, b, c], 1).astype(np.float32)
    op = rng.choice([0.003, 0.3, 0.7, 0.9995], n, p=[0.1, 0.3, 0.4, 0.2]).astype(np.float32)
    col = rng.uniform(size=(n, 4)).astype(np.float32)
    feats = jnp.asarray(np.concatenate([m2, con, op[:, None], col], 1))
    start = jnp.asarray(np.cumsum((0,) + lens[:-1]), jnp.int32)
    return feats, start, jnp.asarray(lens, jnp.int32)


@pytest.mark.heavy
@pytest.mark.parametrize("target,chunk", [("tpu", 8), ("tpu", 5), ("gpu", 8), ("gpu", 16)])
def test_kernel_equals_xla_path_on_hand_made_lists(target, chunk):
    ts = 4
    feats, start, count = hand_lists(ts=ts)
    rng = np.random.default_rng(1)
    v_acc = jnp.asarray(rng.normal(size=(4, ts * ts, 4)).astype(np.float32))
    v_t = jnp.asarray(rng.normal(size=(4, ts * ts)).astype(np.float32))
    lay = TileLayout(tiles_x=2, n_tiles=4, tile_size=ts, chunk=chunk, tile_batch=1)
    klay = kernels.KernelLayout(2, 4, ts, chunk, 4, target, interpret=True)

    def xla(f):
        acc, trans = composite_tiles(jnp.pad(f, ((0, chunk), (0, 0))), start, count, lay)
        return jnp.sum(acc * v_acc) + jnp.sum(trans * v_t), (acc, trans)

    def kernel(f):
        cstart, src, valid = kernels.chunk_layout(start, count, f.shape[0], chunk)
        blocks = kernels.to_chunks(f, src, valid, chunk)
        acc, trans = kernels.composite_chunks(blocks, cstart, count, klay)
        return jnp.sum(acc * v_acc) + jnp.sum(trans * v_t), (acc, trans)

    gx, (ax, tx) = jax.jit(jax.grad(xla, has_aux=True))(feats)
    gk, (ak, tk) = jax.jit(jax.grad(kernel, has_aux=True))(feats)
    np.testing.assert_allclose(np.asarray(ak), np.asarray(ax), atol=1e-5)
    np.testing.assert_allclose(np.asarray(tk), np.asarray(tx), atol=1e-5)
    tx = np.asarray(tx)
    assert (tx < 0.01).any() and (tx > 0.5).any()  # ended and open pixels both present
    gx, gk = np.asarray(gx), np.asarray(gk)
    np.testing.assert_allclose(gk, gx, rtol=1e-3, atol=1e-5 * np.abs(gx).max())
    assert np.abs(gx).sum() > 0


def _pallas_vs_xla(s, kernel, **kw):
    """Values and the six gradients of rasterization with the kernel vs the XLA path."""
    rng = np.random.default_rng(5)
    c, d = len(s["viewmats"]), 1 if kw.get("render_mode") in ("D", "ED") else 3
    d += kw.get("render_mode", "RGB").startswith("RGB+")
    w_img = jnp.asarray(rng.normal(size=(c, s["height"], s["width"], d)).astype(np.float32))
    metas = {}

    def loss(backend, *args):
        x = dict(s) | dict(zip(DIFF, args, strict=True))
        img, alpha, meta = rasterization(**x, backend=backend, kernel=kernel, **kw)
        metas[backend] = meta
        return jnp.sum(img * w_img) + jnp.sum(alpha[..., 0] * w_img[..., 0]), (img, alpha)

    args = [s[k] for k in DIFF]
    grads = jax.grad(loss, argnums=tuple(range(1, 7)), has_aux=True)  # eager: counted capacity
    gx, (ix, ax) = grads("xla", *args)
    gk, (ik, ak) = grads("pallas", *args)
    # colours and alphas (in [0, 1]) to 1e-5; depth channels (metres, ~3 here) to 1e-5 relative
    np.testing.assert_allclose(np.asarray(ik), np.asarray(ix), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ak), np.asarray(ax), atol=1e-5)
    if "D" not in kw.get("render_mode", "RGB"):
        np.testing.assert_allclose(np.asarray(ik), np.asarray(ix), atol=1e-5, rtol=0)
    for name, a, b in zip(DIFF, gk, gx, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(b).max(), err_msg=name)
    assert int(np.asarray(metas["pallas"]["isect_overflow"]).sum()) == 0
    return metas["pallas"]


@pytest.mark.heavy
def test_kernel_equals_xla_path_several_cameras():
    # two cameras; Gaussians behind the camera, off-screen, very large, tiny; chunk 16 does not
    # divide the lists; RGB + accumulated depth; antialiased opacity
    _pallas_vs_xla(scene(1), "tpu", render_mode="RGB+D", rasterize_mode="antialiased",
                   tile_size=8, chunk=16)  # fmt: skip


@pytest.mark.heavy
@pytest.mark.parametrize("kernel,mode", [("tpu", "ED"), ("gpu", "RGB")])
def test_kernel_equals_xla_path_crowded_tile(kernel, mode):
    # > 2000 Gaussians in one 16 px tile, the other tiles nearly empty; the kernels' own chunks
    meta = _pallas_vs_xla(cluster_scene(7), kernel, render_mode=mode)
    assert int(meta["max_tile_count"][0]) > 2000


@pytest.mark.heavy
def test_parallel_xla_path_equals_sequential():
    # tiles sorted by list length into buckets of 3 (one while loop each) vs one tile at a time
    s = scene(1)
    f = lambda tb: jax.grad(
        lambda m: jnp.sum(rasterization(**(s | {"means": m}), backend="xla", tile_size=8,
                                        tile_batch=tb)[0] ** 2))(s["means"])  # fmt: skip
    img = lambda tb: rasterization(**s, backend="xla", tile_size=8, tile_batch=tb)[0]
    np.testing.assert_allclose(np.asarray(img(3)), np.asarray(img(1)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(f(3)), np.asarray(f(1)), rtol=1e-4, atol=1e-5)


def test_backend_resolves_per_platform():
    o = RasterOptions(width=512, height=512)
    r = resolve(o, 3)  # this host: CPU
    assert (r.backend, r.tile_batch, r.chunk, r.platform) == ("xla", 1, 64, "cpu")
    with target_platform("tpu"):
        r = resolve(o, 3)
    assert (r.backend, r.kernel, r.chunk) == ("pallas", "tpu", 128)
    r = resolve(RasterOptions(width=512, height=512, platform="cuda"), 4)
    assert (r.backend, r.kernel, r.chunk) == ("pallas", "gpu", 64)
    # the XLA path on an accelerator: 1024 tiles in 8 buckets of list lengths
    r = resolve(RasterOptions(width=512, height=512, platform="gpu", backend="xla"), 3)
    assert (r.backend, r.tile_batch) == ("xla", 128)
    # auto falls back where the kernel cannot go; an explicit "pallas" says why, in one line
    odd = RasterOptions(width=48, height=48, tile_size=12, platform="gpu")
    assert resolve(odd, 3).backend == "xla"
    with pytest.raises(UserError, match=r"^backend='pallas' cannot render tile_size 12 \(Tri"):
        resolve(
            RasterOptions(width=48, height=48, tile_size=12, platform="gpu", backend="pallas"), 3
        )
    with pytest.raises(UserError, match="chunk 100 on TPU"):
        resolve(RasterOptions(width=64, height=64, platform="tpu", backend="pallas", chunk=100), 3)
    with pytest.raises(UserError, match="backend 'cuda' unknown"):
        RasterOptions(width=8, height=8, backend="cuda")
    # on CPU, "pallas" interprets the TPU kernel
    r = resolve(RasterOptions(width=8, height=8, backend="pallas"), 3)
    assert (r.backend, r.kernel, r.platform) == ("pallas", "tpu", "cpu")


@pytest.mark.heavy
def test_kernel_under_vmap_and_batch_shard_map():
    # the UPM's render: vmapped over avatars, each device's examples under shard_map
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fica_jax import sharding as shd
    from fica_jax.models.upm import render_batch

    scenes = [scene(30 + i, n=36, w=16, h=16, c=1) for i in range(4)]
    g = {k: jnp.asarray(np.stack([sc[k] for sc in scenes]))[:, :, None]
         for k in ("means", "quats", "scales", "opacities", "colors")}  # fmt: skip
    g = {k: v.reshape(4, 6, 6, *v.shape[3:]) for k, v in g.items()}
    vm = jnp.asarray(np.stack([sc["viewmats"][0] for sc in scenes]))
    K = jnp.asarray(np.stack([sc["Ks"][0] for sc in scenes]))
    kw = dict(backend="pallas", isect_capacity=2048, tile_size=8)
    ref = jax.jit(lambda g: render_batch(g, vm, K, 16, 16, backend="xla", isect_capacity=2048,
                                         tile_size=8)["image"])(g)  # fmt: skip
    for i, sc in enumerate(scenes):  # the vmapped XLA path is the per-avatar render
        one = rasterization(**(sc | {"backgrounds": None}), tile_size=8)[0][0]
        np.testing.assert_allclose(np.asarray(ref[i]), np.asarray(one), atol=1e-5)
    plain = jax.jit(lambda g: render_batch(g, vm, K, 16, 16, **kw)["image"])(g)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(ref), atol=1e-5)
    mesh = shd.make_mesh({shd.DATA: 4, shd.FSDP: 2})
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(shd.DATA)))
    with jax.set_mesh(mesh), shd.axis_rules(shd.rules_for("upm")):
        sharded = jax.jit(lambda g, vm, K: render_batch(g, vm, K, 16, 16, **kw)["image"])(
            jax.tree.map(put, g), put(vm), put(K)
        )
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(ref), atol=1e-5)


def test_triton_kernel_lowers_for_cuda():
    # the GPU kernel, forward and backward, lowered to Triton IR on this host (compiled on a GPU;
    # the full render cannot be lowered for CUDA here: its overflow warning is a host callback)
    lay = kernels.KernelLayout(4, 16, 16, 64, 3, "gpu", interpret=False)
    blocks = jax.ShapeDtypeStruct((64, kernels.F_PAD, 64), jnp.float32)
    ids = jax.ShapeDtypeStruct((16,), jnp.int32)

    def loss(blocks, cstart, count):
        acc, trans = kernels.composite_chunks(blocks, cstart, count, lay)
        return jnp.sum(acc) + jnp.sum(trans)

    lowered = jax.jit(jax.grad(loss)).trace(blocks, ids, ids).lower(lowering_platforms=("cuda",))
    calls = [line for line in lowered.as_text().splitlines() if "xla.gpu.triton" in line]
    assert len(calls) == 2, len(calls)
    assert any("fica_composite_fwd" in c for c in calls)
    assert any("fica_composite_bwd" in c for c in calls)


def _on_gpu():
    return jax.default_backend() == "gpu"


@pytest.mark.gpu
@pytest.mark.skipif(not _on_gpu(), reason="needs JAX on a GPU (JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("which", ["cameras", "crowded"])
def test_cuda_kernel_equals_xla_path(which):
    # compiled Triton kernel = the XLA path, on the GPU (benchmarks/gpu_checks.sh runs this)
    if which == "cameras":
        _pallas_vs_xla(scene(1), None, render_mode="RGB+D", tile_size=16)
    else:
        _pallas_vs_xla(cluster_scene(7), None, render_mode="RGB")
