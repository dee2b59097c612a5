"""fica_jax.export.torch_runtime: a saved avatar driven and rendered in PyTorch equals the JAX
`Avatar.drive` / `Avatar.render`; no jax in the runtime; torch.compile; bad bundles."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fica_jax.avatar import bundle as avatar_lib
from fica_jax.errors import UserError
from fica_jax.models import upm, upm_geometry
from fica_jax.quality.image import psnr
from fica_jax.render import composite, project

torch = pytest.importorskip("torch")
pytest.importorskip("gsplat")
from fica_jax.export import torch_runtime as rt  # noqa: E402

B = 8  # frames per batch (the 8 fake CPU devices)


CAM = np.array([[1, 0, 0, 0.01], [0, 1, 0, -0.02], [0, 0, 1, 0.5], [0, 0, 0, 1]], np.float32)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(JAX Avatar, its saved folder): the tiny UPM (explicit eyes) with random parameters (its
    output heads scaled up, so offsets, rotations, scales, opacities and colours all vary), a
    random identity's bias maps and a curved UV sheet's surfel frames (`upm_geometry.surface_frames`).
    Parameters come from numpy, not from an init compile (the tests' time budget)."""
    cfg, rs = upm.VARIANTS["tiny"], np.random.RandomState(0)
    model = nnx.eval_shape(lambda: upm.UPM(cfg, rngs=nnx.Rngs(0)))

    def init(path, x):
        name = jax.tree_util.keystr(path)
        fan_in = np.prod(x.shape[:-1]) if name.endswith("['kernel']") else 100.0
        std = (5.0 if "['head']" in name else 1.0) / np.sqrt(fan_in)
        return jnp.asarray(rs.normal(0, std, x.shape), jnp.float32)

    pure = nnx.state(model, nnx.Param).to_pure_dict()
    nnx.update(model, jax.tree_util.tree_map_with_path(init, pure))
    r = cfg.uv_resolution
    yy, xx = np.mgrid[:r, :r] / r
    geo = np.stack([xx - 0.5, 0.5 - yy, 0.3 * np.sin(3 * xx) * np.cos(2 * yy)], -1) * 0.2
    geo, mask = geo.astype(np.float32), ((xx > 0.05) & (yy > 0.08)).astype(np.float32)
    tex = rs.uniform(0.1, 0.9, (r, r, 3)).astype(np.float32)

    @jax.jit
    def frames(g, m):
        quat, std = upm_geometry.surface_frames(g, m, cfg.footprint, cfg.thickness)
        return quat, std, upm_geometry.eye_centres(g, m, upm.eye_masks(cfg))

    quat, std, centres = frames(geo[None], mask[None])
    biases = [rs.normal(0, 0.5, (1, r >> (cfg.levels - 1 - i), r >> (cfg.levels - 1 - i),
                                 cfg.channels[i] + cfg.color_channels[i])).astype(np.float32)
              for i in range(cfg.levels)]  # fmt: skip
    ident = {"biases": biases, "frame": quat, "std": std, "eye_centres": centres}
    av = avatar_lib.Avatar(model, ident, tex, geo, mask)
    return av, av.save(tmp_path_factory.mktemp("avatar") / "av")


def _camera(size):
    f = 2.0 * size
    return CAM, np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]], np.float32)


def _frames(seed=0, e_dim=18):
    rs = np.random.RandomState(seed)
    view = rs.normal(size=(B, 3)).astype(np.float32) + [0, 0, 2]
    view /= np.linalg.norm(view, axis=-1, keepdims=True)
    e = rs.uniform(0, 1, (B, e_dim)).astype(np.float32)
    return e, view, rs.uniform(-0.3, 0.3, (B, 2)).astype(np.float32)


@pytest.mark.heavy
def test_drive_equals_jax_avatar(bundle):
    av, path = bundle
    tav = rt.TorchAvatar.load(path)
    e, view, gaze = _frames()
    ref = jax.device_get(av.drive(e, view, gaze))
    got = tav.drive(e, view, gaze)
    for k in avatar_lib.GAUSSIAN_KEYS:
        assert got[k].shape == ref[k].shape and got[k].dtype == torch.float32, k
        err = np.abs(got[k].numpy() - ref[k]).max()
        assert err < 1e-4, (k, err)
    # non-trivial: the perturbed heads move texels, and the gaze turns the eyeballs
    assert np.abs(ref["means"] - np.asarray(av.geometry).reshape(-1, 3)).max() > 2e-3
    eyes = np.asarray(upm.eye_masks(av.cfg)).reshape(2, -1).any(0)
    straight = tav.drive(e, view, np.zeros_like(gaze))["means"].numpy()
    moved = np.abs(got["means"].numpy() - straight).max(-1)
    assert moved[:, eyes].mean() > 1e-3 and moved[:, ~eyes].max() == 0
    for k in ("scales", "opacities", "colors"):  # they vary over the texels, not just offsets
        assert ref[k][:, np.asarray(av.mask).reshape(-1) > 0.5].std() > 1e-3, k
    # unbatched and default inputs, as Avatar.drive
    one = tav.drive(e[1], view[1], gaze[1])
    np.testing.assert_allclose(one["colors"].numpy(), ref["colors"][1], atol=1e-4)
    zero = torch.zeros(1, 18), torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 2)
    neutral, want = tav.drive(), tav.drive_fn(*zero)
    assert all(torch.equal(neutral[k], want[k][0]) for k in want)


@pytest.mark.heavy
def test_cpu_render_equals_jax_render(bundle):
    av, path = bundle
    tav = rt.TorchAvatar.load(path)
    size = 96
    viewmat, k = _camera(size)
    e, _, gaze = _frames(3)
    kw = dict(expression=e[0], gaze=gaze[0])
    bg = np.asarray([0.2, 0.5, 0.9], np.float32)
    ref_img, ref_alpha, _ = av.render(viewmat, k, size, size, background=bg, **kw)
    img, alpha, meta = tav.render(viewmat, k, size, size, background=bg, backend="cpu", **kw)
    assert meta["backend"] == "cpu" and img.shape == (size, size, 3)
    p_img = float(psnr(img.numpy(), ref_img))
    p_alpha = float(psnr(alpha.numpy()[..., None], ref_alpha[..., None]))
    err = float(np.abs(img.numpy() - ref_img).max())
    print(f"torch cpu vs JAX at {size} px: PSNR image {p_img:.1f} dB (120 = the metric's cap), "
          f"alpha {p_alpha:.1f} dB, max |diff| {err:.1e}")  # fmt: skip
    assert p_img > 40 and p_alpha > 40 and err < 1e-3
    assert float(ref_alpha.max()) > 0.9 and float((ref_alpha > 0.5).mean()) > 0.2  # in view
    # chunk sizes change only memory, not the image
    g = tav.drive(e[0], rt.view_direction(torch.as_tensor(viewmat)), gaze[0])
    small, _, _ = rt.rasterize_cpu(*(g[n] for n in avatar_lib.GAUSSIAN_KEYS),
                                   torch.as_tensor(viewmat), torch.as_tensor(k), size, size,
                                   eps2d=av.cfg.eps2d, background=torch.as_tensor(bg),
                                   pixel_chunk=1000, gaussian_chunk=100)  # fmt: skip
    np.testing.assert_allclose(small.numpy(), img.numpy(), atol=1e-5)


@pytest.mark.multiprocess
def test_runtime_imports_no_jax_and_mirrors_the_jax_constants():
    code = (
        "import sys; import fica_jax.export.torch_runtime\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax',"
        " 'gsplat'))\n"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (rt.FORMAT, rt.VERSION) == (avatar_lib.FORMAT, avatar_lib.VERSION)
    assert rt.GAUSSIAN_KEYS == avatar_lib.GAUSSIAN_KEYS
    assert (rt.ALPHA_MAX, rt.ALPHA_MIN, rt.T_MIN) == (
        composite.ALPHA_MAX, composite.ALPHA_MIN, composite.T_MIN
    )  # fmt: skip
    assert rt.EXTENT_SIGMA == project.EXTENT_SIGMA


def test_drive_fn_compiles_whole(bundle):
    """fullgraph=True fails on any graph break (.item(), data-dependent branching); the eager
    dynamo backend keeps this fast, the inductor build is the slow test below."""
    tav = rt.TorchAvatar.load(bundle[1])
    e, view, gaze = (torch.as_tensor(x) for x in _frames(1))
    ref = tav.drive_fn(e, view, gaze)
    got = torch.compile(tav.drive_fn, fullgraph=True, backend="eager")(e, view, gaze)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_drive_fn_inductor(bundle):
    tav = rt.TorchAvatar.load(bundle[1])
    e, view, gaze = (torch.as_tensor(x) for x in _frames(2))
    ref = tav.drive_fn(e, view, gaze)
    got = torch.compile(tav.drive_fn, fullgraph=True)(e, view, gaze)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_gsplat_call_binds_to_gsplat_rasterization():
    """Without a GPU: the CUDA path's call fits gsplat 1.5.3's signature, with our conventions."""
    import inspect

    import gsplat

    sig, seen = inspect.signature(gsplat.rasterization), {}

    class Fake:
        @staticmethod
        def rasterization(*args, **kwargs):
            seen.update(sig.bind(*args, **kwargs).arguments)
            return torch.zeros(1, 4, 4, 3), torch.zeros(1, 4, 4, 1), {}

    g = {"means": torch.zeros(5, 3), "quats": torch.zeros(5, 4), "scales": torch.zeros(5, 3),
         "opacities": torch.zeros(5), "colors": torch.zeros(5, 3)}  # fmt: skip
    opts = {"eps2d": 0.1, "near_plane": rt.NEAR, "far_plane": rt.FAR}
    img, alpha, _ = rt.gaussian_rasterization_gsplat(
        g, torch.eye(4), torch.eye(3), 4, 4, torch.ones(3), opts, Fake
    )
    assert img.shape == (4, 4, 3) and alpha.shape == (4, 4)
    assert seen["viewmats"].shape == (1, 4, 4) and seen["backgrounds"].shape == (1, 3)
    assert (seen["packed"], seen["tile_size"], seen["eps2d"]) == (False, 16, 0.1)
    assert (seen["rasterize_mode"], seen["render_mode"], seen["near_plane"]) == (
        "classic", "RGB", 0.01
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: gsplat's CUDA kernels")
def test_gsplat_cuda_equals_cpu_fallback(bundle):
    tav = rt.TorchAvatar.load(bundle[1], device="cuda")
    size = 128
    viewmat, k = _camera(size)
    e, _, gaze = _frames(4)
    kw = dict(expression=e[0], gaze=gaze[0], background=[1.0, 1.0, 1.0])
    img, alpha, meta = tav.render(viewmat, k, size, size, backend="gsplat", **kw)
    assert meta["backend"] == "gsplat" and img.is_cuda
    ref_img, ref_alpha, _ = tav.render(viewmat, k, size, size, backend="cpu", **kw)
    p_img = float(psnr(img.cpu().numpy(), ref_img.cpu().numpy()))
    p_alpha = float(psnr(alpha.cpu().numpy()[..., None], ref_alpha.cpu().numpy()[..., None]))
    print(f"gsplat CUDA vs torch cpu at {size} px: image {p_img:.1f} dB, alpha {p_alpha:.1f} dB")
    assert p_img > 40 and p_alpha > 40 and float(ref_alpha.max()) > 0.9


def _one_line(excinfo, *want):
    msg = str(excinfo.value)
    assert len(msg.splitlines()) == 1 and all(w in msg for w in want), msg


def test_bad_bundle_is_one_clear_error(bundle, tmp_path):
    with pytest.raises(UserError) as e:
        rt.TorchAvatar.load(tmp_path)
    _one_line(e, "holds no avatar.json")
    src = bundle[1]
    meta = json.loads((src / "avatar.json").read_text())
    (tmp_path / "avatar.json").write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(UserError) as e:
        rt.TorchAvatar.load(tmp_path)
    _one_line(e, "v99", "expected fica-avatar v1")
    # an arrays file without the eye masks (one saved before they were stored)
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(src / meta["arrays"]))
    del arrays["eye_masks"]
    save_file(arrays, str(tmp_path / "a.safetensors"))
    (tmp_path / "avatar.json").write_text(json.dumps(meta | {"arrays": "a.safetensors"}))
    with pytest.raises(UserError) as e:
        rt.TorchAvatar.load(tmp_path)
    _one_line(e, "a.safetensors", "eye_masks", "re-save")
    if not torch.cuda.is_available():
        with pytest.raises(UserError) as e:
            rt.TorchAvatar.load(src).render(np.eye(4), np.eye(3), 8, 8, backend="gsplat")
        _one_line(e, "needs CUDA")
    with pytest.raises(UserError) as e:
        rt.TorchAvatar.load(src).render(np.eye(4), np.eye(3), 8, 8, backend="vulkan")
    _one_line(e, "'vulkan' unknown")


def test_layout_conversion():
    conv = np.arange(3 * 3 * 2 * 5, dtype=np.float32).reshape(3, 3, 2, 5)  # HWIO
    t = rt.to_torch_layout("params['head']['kernel']", conv)
    assert t.shape == (5, 2, 3, 3) and t[4, 1, 2, 0] == conv[2, 0, 1, 4]
    dense = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert rt.to_torch_layout("params['fc1']['kernel']", dense).shape == (3, 2)
    bias = np.zeros((1, 4, 4, 7), np.float32)
    assert rt.to_torch_layout("bias/0", bias).shape == (1, 7, 4, 4)
