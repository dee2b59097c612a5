"""Evaluation metrics against independent references (docs/evaluation.md).

- PSNR / SSIM (plain, masked, pooled and per image) vs scikit-image.
- LPIPS v0.1 vs the `lpips` package's own code: its `lpips.py` / `pretrained_networks.py` run
  unmodified with `torchvision` stubbed by plain-torch `features` stacks built exactly like
  torchvision's AlexNet / VGG16 (random weights), and its real v0.1 heads from the wheel's
  `weights/v0.1/{alex,vgg}.pth`. Needs `pip install --no-deps lpips==0.1.4`; skipped without.
- ArcFace iresnet vs a plain-torch iresnet written here in insightface's key layout (random
  weights and BN statistics), embeddings and ID-CSIM.
- Alignment vs skimage's `SimilarityTransform` and `warp`; the face-region mask on a synthetic
  capture frame.
"""

import importlib.util
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import SimilarityTransform, warp
from torch import nn

from fica_jax.errors import UserError
from fica_jax.quality import arcface, face
from fica_jax.quality import image as metrics
from fica_jax.quality import lpips as lp


# ----------------------------------------------------------------------------- PSNR / SSIM
def _pair(seed=0, shape=(2, 40, 48, 3)):
    r = np.random.default_rng(seed)
    a = r.random(shape).astype(np.float32)
    b = np.clip(a + 0.15 * r.normal(size=shape), 0, 1).astype(np.float32)
    mask = r.random(shape[:-1]) > 0.4
    return a, b, mask


def _sk_ssim(a, b):
    return structural_similarity(a.astype(np.float64), b.astype(np.float64), gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False, data_range=1,
                                 channel_axis=-1, full=True)  # fmt: skip


def test_psnr_ssim_match_skimage():
    a, b, mask = _pair()
    ja, jb, jm = jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask)
    ref_ssim, ref_mssim, ref_psnr, ref_mpsnr, num, den = [], [], [], [], 0.0, 0.0
    for i in range(len(a)):
        s, smap = _sk_ssim(a[i], b[i])
        m = mask[i, 5:-5, 5:-5]  # the map cropped by the window radius, as skimage's mean does
        ref_ssim.append(s)
        ref_mssim.append(smap[5:-5, 5:-5].mean(-1)[m].mean())
        num, den = num + smap[5:-5, 5:-5].mean(-1)[m].sum(), den + m.sum()
        ref_psnr.append(peak_signal_noise_ratio(a[i], b[i], data_range=1))
        se = np.square(a[i].astype(np.float64) - b[i])[mask[i]]
        ref_mpsnr.append(10 * np.log10(1 / se.mean()))
    np.testing.assert_allclose(metrics.ssim(ja, jb), ref_ssim, atol=1e-4)
    np.testing.assert_allclose(metrics.psnr(ja, jb), ref_psnr, atol=1e-4)
    np.testing.assert_allclose(
        metrics.masked_ssim(ja, jb, jm, per_image=True), ref_mssim, atol=1e-4
    )
    np.testing.assert_allclose(metrics.masked_ssim(ja, jb, jm), num / den, atol=1e-4)
    np.testing.assert_allclose(
        metrics.masked_psnr(ja, jb, jm, per_image=True), ref_mpsnr, atol=1e-4
    )
    se = np.square(a.astype(np.float64) - b)[mask]
    np.testing.assert_allclose(metrics.masked_psnr(ja, jb, jm), 10 * np.log10(1 / se.mean()),
                               atol=1e-4)  # fmt: skip


def test_weights_unavailable_names_the_path(tmp_path):
    there = tmp_path / "a.pth"
    there.write_bytes(b"x")
    assert metrics.weights_unavailable(there) is None
    msg = metrics.weights_unavailable(there, tmp_path / "missing.pth")
    assert msg == f"unavailable (no weights at {tmp_path / 'missing.pth'})"
    with pytest.raises(UserError, match="missing.pth"):
        lp.load_lpips("alex", tmp_path / "missing.pth", there)
    with pytest.raises(UserError, match="nope.pth"):
        arcface.load_arcface(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------- LPIPS
def _lpips_dir() -> Path | None:
    spec = importlib.util.find_spec("lpips")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / "weights/v0.1/alex.pth").is_file() else None


def _torchvision_features(net: str) -> nn.Sequential:
    """torchvision's `alexnet().features` / `vgg16().features` (same modules, same indices)."""
    if net == "alex":
        return nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )  # fmt: skip
    mods, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
              "M"):  # fmt: skip
        if v == "M":
            mods.append(nn.MaxPool2d(2, 2))
        else:
            mods += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*mods)


@pytest.fixture(scope="module")
def lpips_reference():
    """{net: (lpips.LPIPS model, backbone features)} built by the lpips package's own code."""
    d = _lpips_dir()
    if d is None:
        pytest.skip("lpips wheel absent: pip install --no-deps lpips==0.1.4")
    torch.manual_seed(0)
    feats = {"alex": _torchvision_features("alex"), "vgg": _torchvision_features("vgg")}
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(
        alexnet=lambda pretrained=True: types.SimpleNamespace(features=feats["alex"]),
        vgg16=lambda pretrained=True: types.SimpleNamespace(features=feats["vgg"]),
    )
    before = set(sys.modules)
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
    sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, tv.models
    try:
        import lpips as ref  # noqa: PLC0415  (the package, with the stub in place)

        assert Path(ref.__file__).parent == d
        models = {n: ref.LPIPS(net=n, version="0.1", verbose=False) for n in feats}
    finally:  # leave no stub or stub-bound module behind for other tests
        for k in set(sys.modules) - before:
            if k.split(".")[0] in ("lpips", "torchvision"):  # others (scipy, tqdm) stay loaded
                del sys.modules[k]
        for k, v in saved.items():
            if v is not None:
                sys.modules[k] = v
    return {n: (models[n], feats[n], d / f"weights/v0.1/{n}.pth") for n in feats}


@pytest.mark.parametrize("net,size", [("alex", 64), ("vgg", 40)])
def test_lpips_matches_lpips_package(lpips_reference, tmp_path, net, size):
    """Our LPIPS (backbone copied from the stubbed torchvision stack via a `features.*` .pth, the
    wheel's real v0.1 heads) equals `lpips.LPIPS(net, version='0.1').forward` on the same
    weights, for [-1, 1] inputs (normalize=False) and for [0, 1] inputs (normalize=True)."""
    model, feats, heads = lpips_reference[net]
    path = tmp_path / f"{net}.pth"
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
    params = lp.load_lpips(net, path, heads)
    sd = torch.load(heads, map_location="cpu")
    for i, w in enumerate(params["lins"]):  # the real heads, not a default
        np.testing.assert_array_equal(w, sd[f"lin{i}.model.1.weight"].numpy().reshape(-1))
    r = np.random.default_rng(1)
    x0 = r.uniform(0, 1, (2, size, size, 3)).astype(np.float32)
    x1 = np.clip(x0 + 0.2 * r.normal(size=x0.shape), 0, 1).astype(np.float32)
    t = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)  # noqa: E731
    with torch.no_grad():
        want = model(t(2 * x0 - 1), t(2 * x1 - 1)).reshape(-1).numpy()
        want01 = model(t(x0), t(x1), normalize=True).reshape(-1).numpy()
    got = lp.lpips(jnp.asarray(2 * x0 - 1), jnp.asarray(2 * x1 - 1), params, net)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(lp.lpips_01(jnp.asarray(x0), jnp.asarray(x1), params, net), want01,
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    assert want.min() > 1e-3  # a real distance, not a trivially zero one
    assert float(lp.lpips(jnp.asarray(2 * x0 - 1), jnp.asarray(2 * x0 - 1), params, net)[0]) < 1e-9


def test_lpips_range_checks():
    params = {"convs": [], "lins": []}  # the checks run before any weights are touched
    x = jnp.full((1, 16, 16, 3), 0.5)
    with pytest.raises(ValueError, match="lpips_01"):
        lp.lpips(x, x, params)  # [0, 1] data passed to the [-1, 1] function
    with pytest.raises(ValueError, match=r"expected \[-1, 1\]"):
        lp.lpips(x.at[0, 0, 0, 0].set(-1.5), x, params)
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        lp.lpips_01(x * 2 - 1.5, x, params)
    with pytest.raises(ValueError, match="backbone"):
        lp.lpips(x, x, params, net="squeeze")


# ----------------------------------------------------------------------------- ArcFace
class _TorchBlock(nn.Module):
    """insightface IBasicBlock (recognition/arcface_torch/backbones/iresnet.py)."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5)
            )

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class _TorchIResNet(nn.Module):
    def __init__(self, layers, width, features):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu = nn.PReLU(width)
        cin = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = [_TorchBlock(cin if j == 0 else planes, planes, 2 if j == 0 else 1)
                      for j in range(n)]  # fmt: skip
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(cin * 49, features)
        self.features = nn.BatchNorm1d(features, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


def test_arcface_matches_torch_iresnet(tmp_path):
    """Embeddings of our NNX iresnet loaded from a torch `backbone.pth`-layout state dict equal
    the torch network's (eval mode, random weights, random BN statistics), and ID-CSIM equals
    torch's cosine similarity."""
    torch.manual_seed(0)
    net = _TorchIResNet((1, 2, 1, 1), width=8, features=32)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
    net.eval()
    path = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), path)
    model = arcface.load_arcface(path)
    assert model.cfg == arcface.IResNetConfig((1, 2, 1, 1), 8, 32)
    faces = np.random.default_rng(0).uniform(0, 1, (4, 112, 112, 3)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(faces * 2 - 1).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(arcface.embed(model, jnp.asarray(faces)))
    err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert err.max() < 1e-4, err
    cs = torch.nn.functional.cosine_similarity(
        torch.from_numpy(want[:2]), torch.from_numpy(want[2:])
    )
    np.testing.assert_allclose(arcface.id_csim(got[:2], got[2:]), cs.numpy(), atol=1e-5)
    with pytest.raises(UserError, match="not iresnet50"):
        arcface.load_arcface(path, variant="iresnet50")


def test_arcface_variant_table():
    sizes = {k: v.layers for k, v in arcface.VARIANTS.items()}
    assert sizes["iresnet50"] == (3, 4, 14, 3) and sizes["iresnet100"] == (3, 13, 30, 3)
    assert sizes["iresnet18"] == (2, 2, 2, 2)
    # a state dict with the wrong keys is a user error, not a KeyError
    with pytest.raises(UserError, match="iresnet"):
        arcface.config_from_state_dict({"foo.weight": np.zeros(3)})


# ----------------------------------------------------------------------------- alignment
def test_similarity_transform_matches_skimage_and_recovers_a_known_one():
    r = np.random.default_rng(0)
    src = r.uniform(20, 200, (5, 2))
    dst = face.ARCFACE_TEMPLATE + r.normal(0, 2, (5, 2))
    if hasattr(SimilarityTransform, "from_estimate"):  # skimage >= 0.26
        ref = SimilarityTransform.from_estimate(src, dst)
    else:
        ref = SimilarityTransform()
        ref.estimate(src, dst)
    np.testing.assert_allclose(face.similarity_transform(src, dst), ref.params, atol=1e-5)
    ang, s, t = 0.3, 0.45, np.array([12.0, -7.0])
    rot = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    m = face.similarity_transform(src, src @ rot.T + t)
    np.testing.assert_allclose(m[:2, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:2, 2], t, atol=1e-9)


def test_five_points_and_warp():
    """Five points from iBUG-68 indices; the warp equals skimage's bilinear warp (zeros outside)
    and puts blobs drawn at the five points (our +0.5 pixel centres) onto the template."""
    r = np.random.default_rng(0)
    kpts = r.uniform(0, 100, (68, 2))
    five = face.five_points(kpts)
    np.testing.assert_allclose(five[0], kpts[36:42].mean(0))
    np.testing.assert_allclose(five[1], kpts[42:48].mean(0))
    np.testing.assert_allclose(five[2:], kpts[[30, 48, 54]])
    # landmarks of a face that is an exact similarity of the template: the fit is exact
    ang, s = -0.25, 1.7
    rot = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    pts = face.ARCFACE_TEMPLATE @ rot.T + np.array([40.0, 30.0]) + 0.5  # continuous coordinates
    kpts[36:42], kpts[42:48], kpts[[30, 48, 54]] = pts[0], pts[1], pts[2:]
    h, w = 200, 230
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    img = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2)) for x, y in pts)
    img = np.stack([img, 1 - img, r.uniform(0, 1, (h, w))], -1).astype(np.float32)
    m = face.align_matrix(kpts)
    crop = np.asarray(face.align_faces(jnp.asarray(img[None]), kpts[None]))[0]
    ref = warp(img.astype(np.float64), np.linalg.inv(m), output_shape=(112, 112), order=1,
               mode="constant", cval=0, preserve_range=True)  # fmt: skip
    np.testing.assert_allclose(crop, ref, atol=1e-4)  # float32 coordinates here
    gy, gx = np.mgrid[0:112, 0:112]  # crop index coordinates
    for x, y in face.ARCFACE_TEMPLATE:
        win = (np.abs(gx - x) < 6) & (np.abs(gy - y) < 6)
        wt = crop[..., 0] * win
        cx, cy = (wt * gx).sum() / wt.sum(), (wt * gy).sum() / wt.sum()
        assert abs(cx - x) < 0.15 and abs(cy - y) < 0.15, (cx, cy, x, y)


# ----------------------------------------------------------------------------- face region
def test_face_mask_on_a_synthetic_frame(synth_dir):
    from data_pipelines.source import CaptureSource
    from fica_jax.geometry.template import make_head_template

    src = CaptureSource(synth_dir, "train")
    name = src.metadata["template"]["template"]
    template = make_head_template(int(name.rsplit("r", 1)[1]))
    assert template.name == name
    rec = src[0]
    masks = face.record_face_masks(rec, template)
    head = rec["view_mask"].astype(bool)
    assert masks.shape == head.shape and masks.dtype == bool
    for v in range(len(masks)):
        m = masks[v]
        assert not (m & ~head[v]).any()  # never on the background
        assert 0 < m.sum() < 0.8 * head[v].sum()  # the face, not the whole head
        # visible inner landmarks (nose, eyes, mouth; jaw and brows are the outline) fall on it:
        # most on their own pixel, all within one pixel (~1 cm at 32 px, profile views)
        inner = np.arange(27, 68)
        vis = rec["view_kpts_visible"][v][inner].astype(bool)
        x, y = np.floor(rec["view_kpts"][v][inner][vis]).astype(int).T
        assert m[y, x].mean() > 0.75, (v, m[y, x].mean())
        pad = np.pad(m, 1)
        near = np.zeros_like(x, bool)
        for dy in range(3):
            for dx in range(3):
                near |= pad[y + dy, x + dx]
        assert near.all(), (v, inner[vis][~near])
    fv = face.face_vertices(template)
    assert fv[template.landmark_ids[27:36]].all()  # the nose is face
    back = template.verts[:, 2] < 0
    assert not fv[back].any()
