"""Checkpoint reading (safetensors / HF dir / .pth) and assigning with key reports."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from fica_jax.errors import UserError
from fica_jax.models import dense_heads, layers, weights


def _sd():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "a.bias": torch.randn(4, generator=g),
        "b": torch.randn(2, 2, generator=g).to(torch.bfloat16),
    }


def _same(got, sd):
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], v.float().numpy())


def test_load_safetensors_file_and_dir(tmp_path):
    sd = _sd()
    save_file(sd, tmp_path / "model.safetensors")
    _same(weights.load_state_dict(tmp_path / "model.safetensors"), sd)
    _same(weights.load_state_dict(tmp_path), sd)


def test_load_sharded_dir(tmp_path):
    sd = _sd()
    save_file({"a.weight": sd["a.weight"]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in ("a.bias", "b")}, tmp_path / "model-00002-of-00002.safetensors")
    wm = {"a.weight": "model-00001-of-00002.safetensors"}
    wm |= {k: "model-00002-of-00002.safetensors" for k in ("a.bias", "b")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    _same(weights.load_state_dict(tmp_path), sd)


def test_load_mmpretrain_pth_unwraps_state_dict(tmp_path):
    sd = _sd()
    torch.save({"meta": {"epoch": 3}, "state_dict": sd}, tmp_path / "sapiens.pth")
    _same(weights.load_state_dict(tmp_path / "sapiens.pth"), sd)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": _sd(), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="evil.pth.*Unsupported global: GLOBAL print"):
        weights.load_state_dict(tmp_path / "evil.pth")


def test_bad_paths_name_the_path(tmp_path):
    with pytest.raises(UserError, match="nope.safetensors.*does not exist"):
        weights.load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty holds no weights"):
        weights.load_state_dict(tmp_path / "empty")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(UserError, match="w.txt has an unknown suffix"):
        weights.load_state_dict(tmp_path / "w.txt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="junk.safetensors"):
        weights.load_state_dict(tmp_path / "junk.safetensors")


@pytest.mark.heavy
def test_layout_converters_match_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)  # NHWC
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    rngs = nnx.Rngs(0)
    # Linear
    tl = torch.nn.Linear(3, 4)
    fl = layers.linear(3, 4, (None, None), rngs=rngs)
    fl.kernel.set_value(jnp.asarray(weights.linear_kernel(tl.weight.detach().numpy())))
    fl.bias.set_value(jnp.asarray(tl.bias.detach().numpy()))
    np.testing.assert_allclose(fl(x), tl(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    # Conv 3x3 stride 2 pad 1
    tc = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    fc = layers.conv(3, 4, 3, stride=2, padding=1, rngs=rngs)
    fc.kernel.set_value(jnp.asarray(weights.conv_kernel(tc.weight.detach().numpy())))
    fc.bias.set_value(jnp.asarray(tc.bias.detach().numpy()))
    ref = tc(xt).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(fc(x), ref, atol=1e-5)
    # Transposed conv 4x4 stride 2 pad 1 (x2 upsampling)
    tt = torch.nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1)
    ft = nnx.ConvTranspose(3, 4, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), rngs=rngs)
    ft.kernel.set_value(jnp.asarray(weights.conv_transpose_kernel(tt.weight.detach().numpy())))
    ft.bias.set_value(jnp.asarray(tt.bias.detach().numpy()))
    ref = tt(xt).detach().numpy().transpose(0, 2, 3, 1)
    assert ref.shape == (2, 10, 12, 4)
    np.testing.assert_allclose(ft(x), ref, atol=1e-5)


def test_conv_transpose_import_into_subpixel_form_matches_torch():
    """A torch ConvTranspose2d(4, 2, padding=1) weight, imported with conv_transpose_kernel, gives
    torch's output and gradients through the sub-pixel layer, odd sizes included."""
    g = torch.Generator().manual_seed(1)
    tt = torch.nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1, bias=False)
    with torch.no_grad():
        tt.weight.copy_(torch.randn(tt.weight.shape, generator=g))
    xt = torch.randn(2, 3, 5, 7, generator=g, requires_grad=True)
    ct = torch.randn(2, 4, 10, 14, generator=g)
    yt = tt(xt)
    yt.backward(ct)
    kernel = jnp.asarray(weights.conv_transpose_kernel(tt.weight.detach().numpy()))
    x = jnp.asarray(xt.detach().numpy().transpose(0, 2, 3, 1))
    for impl in ("conv", "dot"):
        y, vjp = jax.vjp(
            lambda x, k, impl=impl: dense_heads.upsample_conv_x2(x, k, impl), x, kernel
        )
        np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
        gx, gk = vjp(jnp.asarray(ct.numpy().transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(gx, xt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-5)
        # the importer is a pure re-layout, so it maps torch's weight gradient onto ours
        gk_ref = weights.conv_transpose_kernel(tt.weight.grad.numpy())
        np.testing.assert_allclose(gk, gk_ref, atol=1e-4, rtol=1e-5)


def test_assign_reports_missing_unexpected_and_mismatched():
    m = layers.Mlp(4, 8, rngs=nnx.Rngs(0))
    good = weights.export(m)
    arrays = {p: np.ones_like(a) for p, a in good.items()}
    rep = weights.assign(m, arrays)
    assert rep.ok and rep.loaded == 4
    np.testing.assert_array_equal(m.fc1.kernel.get_value(), 1.0)

    bad = dict(arrays)
    del bad[("fc2", "bias")]
    bad[("fc1", "kernel")] = np.zeros((8, 4), np.float32)
    bad[("fc3", "kernel")] = np.zeros((1,), np.float32)
    with pytest.raises(UserError) as e:
        weights.assign(m, {p: a * 2 for p, a in bad.items()}, what="Mlp(4, 8)", unexpected=["zz"])
    msg = str(e.value)
    assert "does not fit Mlp(4, 8)" in msg
    assert "1 missing [fc2/bias]" in msg
    assert "2 unexpected [fc3/kernel, zz]" in msg
    assert "fc1/kernel: (8, 4) -> (4, 8)" in msg
    # strict failure assigned nothing
    np.testing.assert_array_equal(m.fc2.kernel.get_value(), 1.0)
    rep = weights.assign(m, {p: a * 2 for p, a in bad.items()}, strict=False)
    assert rep.missing == ["fc2/bias"] and rep.loaded == 2 and not rep.ok
    np.testing.assert_array_equal(m.fc2.kernel.get_value(), 2.0)


def test_load_pytorch_model_bin_dir(tmp_path):
    sd = _sd()
    (tmp_path / "config.json").write_text("{}")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    _same(weights.load_state_dict(tmp_path), sd)


def test_stack_layers_reports_incomplete_blocks():
    per = {(("blocks", "w"), i): np.full((2,), i, np.float32) for i in range(3)}
    per[(("blocks", "b"), 0)] = np.zeros(1, np.float32)
    stacked, problems = weights.stack_layers(per, 3)
    np.testing.assert_array_equal(stacked[("blocks", "w")][:, 0], [0, 1, 2])
    assert ("blocks", "b") not in stacked
    assert problems == ["blocks/b: blocks [1, 2] absent"]
