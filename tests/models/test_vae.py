"""AutoencoderKL: parity with diffusers (copied random weights), checkpoint import, shapes of the
full SDXL model, bf16, remat and sharding on the fake 8-device mesh."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from flax import nnx
from jax.sharding import PartitionSpec as P

import fica_jax  # noqa: F401  (turns off eager sharding)
from fica_jax import sharding as shd
from fica_jax.errors import UserError
from fica_jax.models import layers
from fica_jax.models import vae as V
from fica_jax.models import vae_import as VI

TINY_TORCH = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
    scaling_factor=0.13025,
)
SDXL_TORCH = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    m = TorchAutoencoderKL(**TINY_TORCH).eval()
    with torch.no_grad():  # default norms are (1, 0) and biases 0: randomise them so they count
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    return m


@pytest.fixture(scope="module")
def torch_state(torch_vae):
    return {k: v.numpy() for k, v in torch_vae.state_dict().items()}


@pytest.fixture(scope="module")
def image():
    return np.random.RandomState(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(torch_vae, image):
    with torch.no_grad():
        post = torch_vae.encode(torch.from_numpy(image)).latent_dist
        return dict(
            mean=_nhwc(post.mean),
            logvar=_nhwc(post.logvar),
            kl=post.kl().numpy(),
            decoded=_nhwc(torch_vae.decode(post.mean).sample),
            forward=_nhwc(torch_vae(torch.from_numpy(image), sample_posterior=False).sample),
        )


def _tiny(**kw) -> V.AutoencoderKL:
    return V.AutoencoderKL(V.VARIANTS["tiny"], rngs=nnx.Rngs(0), **kw)


def _check_parity(model, image, reference):
    x = jnp.asarray(image.transpose(0, 2, 3, 1))
    post = model.encode(x)
    assert post.mean.shape == (2, 16, 16, 4)
    assert len(jax.tree.leaves(post)) == 2  # a pytree: can leave jit / enter losses
    np.testing.assert_allclose(post.mean, reference["mean"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(post.logvar, reference["logvar"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(post.kl(), reference["kl"], rtol=1e-4)
    decoded = model.decode(post.mean)
    assert decoded.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(decoded, reference["decoded"], atol=1e-4, rtol=0)
    recon, _ = model(x)
    np.testing.assert_allclose(recon, reference["forward"], atol=1e-4, rtol=0)


@pytest.mark.heavy
def test_parity_with_diffusers_f32(torch_state, image, reference):
    model = _tiny()
    report = VI.load_torch_state_dict(model, torch_state)
    assert report.ok and report.loaded == len(torch_state) == 124
    _check_parity(model, image, reference)
    # Latent helpers: scaled posterior mean and its exact inverse scaling.
    x = jnp.asarray(image.transpose(0, 2, 3, 1))
    z = model.encode_to_latent(x)
    np.testing.assert_allclose(z, reference["mean"] * 0.13025, atol=1e-5)
    np.testing.assert_allclose(model.decode_from_latent(z), reference["decoded"], atol=1e-4)


def test_from_pretrained_of_save_pretrained(torch_vae, torch_state, image, reference, tmp_path):
    torch_vae.save_pretrained(tmp_path / "pipe" / "vae")
    model = VI.from_pretrained(tmp_path / "pipe" / "vae")
    assert model.cfg.scaling_factor == 0.13025 and model.cfg.block_out_channels == (32, 64)
    _check_parity(model, image, reference)
    # A pipeline directory with a vae/ folder works as well.
    assert VI.from_pretrained(tmp_path / "pipe").cfg.norm_groups == 8
    # A bare safetensors file needs the architecture from the caller.
    single = tmp_path / "pipe" / "vae" / VI.WEIGHTS_NAME
    np.testing.assert_allclose(
        VI.from_pretrained(single, cfg=V.VARIANTS["tiny"]).encode(image.transpose(0, 2, 3, 1)).mean,
        reference["mean"],
        atol=1e-4,
    )


def test_deprecated_attention_names_load(torch_state, image, reference):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in torch_state.items():
        for new_name, old_name in old.items():
            k = k.replace(f".{new_name}.", f".{old_name}.")
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    model = _tiny()
    VI.load_torch_state_dict(model, renamed)
    _check_parity(model, image, reference)


def _to_ldm(state: dict, n: int) -> dict:
    """diffusers names -> original CompVis names (attention projections as 1x1 convs)."""
    subs = (
        (r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}"),
        (r"mid_block\.attentions\.0\.group_norm", "mid.attn_1.norm"),
        (r"mid_block\.attentions\.0\.to_(q|k|v)\.", r"mid.attn_1.\1."),
        (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
        (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n - 1 - int(m[1])}.block."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n - 1 - int(m[1])}.upsample."),
        (r"conv_shortcut", "nin_shortcut"),
        (r"conv_norm_out", "norm_out"),
    )
    out = {}
    for k, v in state.items():
        for pattern, repl in subs:
            k = re.sub(pattern, repl, k)
        out[k] = v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v
    return out


def test_original_ldm_checkpoint_loads(torch_state, image, reference, tmp_path):
    ldm = _to_ldm(torch_state, 2)
    assert "decoder.up.1.block.0.conv1.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    # The test's renaming is checked against diffusers' own single-file converter.
    back = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()}, TINY_TORCH)
    assert sorted(back) == sorted(torch_state)
    for k, v in back.items():
        np.testing.assert_array_equal(v.numpy(), torch_state[k])
    # A full-model file: only the first_stage_model. tensors are the VAE's.
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((2, 2), np.float32)
    safetensors.numpy.save_file(full, str(tmp_path / "sd_full.safetensors"))
    model = VI.from_pretrained(tmp_path / "sd_full.safetensors", cfg=V.VARIANTS["tiny"])
    _check_parity(model, image, reference)


def test_mismatched_keys_are_reported(torch_state):
    bad = dict(torch_state)
    bad.pop("decoder.conv_out.bias")
    bad["encoder.extra_layer.weight"] = np.zeros(3, np.float32)
    bad["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    model = _tiny()
    before = np.asarray(model.quant_conv.kernel[...])
    with pytest.raises(UserError) as e:
        VI.load_torch_state_dict(model, bad)
    msg = str(e.value)
    assert "decoder/conv_out/bias" in msg and "encoder.extra_layer.weight" in msg
    assert "quant_conv.weight: (3, 3, 8, 8) -> (1, 1, 8, 8)" in msg
    np.testing.assert_array_equal(model.quant_conv.kernel[...], before)  # strict: untouched
    report = VI.load_torch_state_dict(model, bad, strict=False)
    assert report.missing == ["decoder/conv_out/bias"]
    assert report.unexpected == ["encoder.extra_layer.weight"]
    assert len(report.mismatched) == 1 and report.loaded == 122


def test_bad_paths_raise_user_error(tmp_path, torch_state):
    with pytest.raises(UserError, match="does not exist.*config.json"):
        VI.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        VI.from_pretrained(tmp_path / "empty")
    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_text(json.dumps({"block_out_channels": [32, 64]}))
    (only_bin / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="safe_serialization"):
        VI.from_pretrained(only_bin)
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match="not a .safetensors file"):
        VI.from_pretrained(tmp_path / "x.ckpt")
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    safetensors.numpy.save_file(torch_state, str(unet / VI.WEIGHTS_NAME))
    with pytest.raises(UserError, match="expected 'AutoencoderKL'"):
        VI.from_pretrained(unet)
    # The tiny weights given to the SDXL architecture: a shape report naming the file.
    with pytest.raises(UserError, match=r"diffusion_pytorch_model.safetensors: .*shape-mismatched"):
        VI.from_pretrained(unet / VI.WEIGHTS_NAME)


def test_sdxl_shapes_params_and_key_map():
    cfg = V.VARIANTS["sdxl"]
    model = nnx.eval_shape(lambda: V.AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    assert layers.num_params(model) == 83_653_863  # == sum(p.numel()) of diffusers' SDXL VAE
    assert shd.unannotated_params(model) == []
    x = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    post = nnx.eval_shape(lambda m, x: m.encode(x), model, x)
    assert post.mean.shape == post.logvar.shape == (1, 64, 64, 4)
    out = nnx.eval_shape(lambda m, z: m.decode_from_latent(z), model, post.mean)
    assert out.shape == (1, 512, 512, 3)
    # Every tensor of diffusers' SDXL VAE (built on the meta device: shapes only) maps onto ours.
    with torch.device("meta"):
        ref = TorchAutoencoderKL(**SDXL_TORCH)
    shapes = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in ref.state_dict().items()}
    _, report = VI.match_state_dict(model, shapes)
    assert report.ok and report.loaded == len(shapes), str(report)
    _, report = VI.match_state_dict(model, _to_ldm(shapes, 4))  # reversed up blocks, widths differ
    assert report.ok and report.loaded == len(shapes), str(report)


@pytest.mark.heavy
def test_bf16_compute_close_to_f32(torch_state, image):
    x = jnp.asarray(image.transpose(0, 2, 3, 1))
    m32, m16 = _tiny(), _tiny(dtype=jnp.bfloat16)
    VI.load_torch_state_dict(m32, torch_state)
    VI.load_torch_state_dict(m16, torch_state)
    assert m16.encoder.conv_in(x).dtype == jnp.bfloat16
    assert m16.encoder.conv_in.kernel[...].dtype == jnp.float32  # params stay f32
    (r32, p32), (r16, p16) = m32(x), m16(x)
    assert p16.mean.dtype == r16.dtype == jnp.float32
    assert np.isfinite(np.asarray(r16)).all()
    scale = float(jnp.abs(r32).max())
    assert float(jnp.abs(r16 - r32).max()) < 0.05 * scale
    assert float(jnp.abs(p16.mean - p32.mean).max()) < 0.05 * float(jnp.abs(p32.mean).max())


def _remat_policies(m, fn) -> list:
    """The `policy` of every remat (jax.checkpoint) equation in the jaxpr of `fn(m)`."""
    graphdef, state = nnx.split(m)
    jaxpr = jax.make_jaxpr(lambda s: fn(nnx.merge(graphdef, s)))(state)
    return [e.params["policy"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "remat2"]


@pytest.mark.heavy
def test_remat_policy_names_give_same_loss_and_grads():
    x = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)

    def loss(m):
        recon, post = m(x, jax.random.key(0))
        return jnp.mean(jnp.square(recon - x)) + 1e-3 * jnp.mean(post.kl())

    cfg = V.VARIANTS["tiny"]
    build = lambda remat: V.AutoencoderKL(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(3))
    models = {name: build(name) for name in ("none", "full", "dots_saveable")}
    n_ckpt = 4 + 6  # resnets: enc 2 + 2 mid; dec 2 mid + 2*2
    assert _remat_policies(models["none"], loss) == []
    for name, want in (("full", jax.checkpoint_policies.nothing_saveable),
                       ("dots_saveable", jax.checkpoint_policies.dots_saveable)):  # fmt: skip
        policies = _remat_policies(models[name], loss)
        assert len(policies) == n_ckpt and all(p is want for p in policies), (name, policies)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(models["none"])
    for name in ("full", "dots_saveable"):
        l2, g2 = nnx.jit(nnx.value_and_grad(loss))(models[name])
        np.testing.assert_allclose(l1, l2, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(UserError, match="remat='dots'"):
        build("dots")


@pytest.mark.heavy
def test_sharded_params_and_forward_on_mesh():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.rules_for("vae")
    model = shd.sharded_init(lambda: _tiny(), mesh, rules)
    assert shd.unannotated_params(model) == []
    spec = lambda v: v[...].sharding.spec
    conv = model.encoder.down_blocks[1].resnets[0].conv1  # [3, 3, 32, 64]
    assert spec(conv.kernel) == P(None, None, "tensor", "fsdp")
    assert spec(conv.bias) == P("fsdp")
    assert spec(model.encoder.down_blocks[1].resnets[0].norm1.scale) == P(None)
    assert spec(model.decoder.mid_block.attention.attn.q.kernel) == P("fsdp", "tensor")
    assert spec(model.decoder.conv_out.kernel) == P(None, None, "tensor", None)  # 3 outputs
    assert len({s.device for s in conv.kernel[...].addressable_shards}) == 8

    x = np.random.RandomState(2).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)

    @nnx.jit
    def forward(m, x):
        with shd.axis_rules(rules):
            recon, post = m(shd.constrain(x, shd.BATCH, shd.HEIGHT, shd.WIDTH, shd.CHANNELS))
            return recon, post.mean

    with jax.set_mesh(mesh):
        recon, mean = forward(model, shd.put_batch({"x": x}, mesh)["x"])
    assert recon.sharding.spec[0] == ("data", "fsdp")
    ref_recon, ref_post = _tiny()(jnp.asarray(x))
    np.testing.assert_allclose(recon, ref_recon, atol=1e-5)
    np.testing.assert_allclose(mean, ref_post.mean, atol=1e-5)


def test_sdxl_golden_specs_on_fsdp_tensor_mesh():
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    model = nnx.eval_shape(lambda: V.AutoencoderKL(V.VARIANTS["sdxl"], rngs=nnx.Rngs(0)))
    specs = dict(nnx.to_flat_state(shd.param_specs(nnx.state(model), shd.rules_for("vae"), mesh)))
    get = lambda path: specs[tuple(int(p) if p.isdigit() else p for p in path.split("/"))]
    full = P(None, None, "tensor", "fsdp")
    assert get("encoder/down_blocks/3/resnets/1/conv2/kernel") == full
    assert get("decoder/up_blocks/0/resample/conv/kernel") == full
    assert get("encoder/conv_in/kernel") == P(None, None, None, "fsdp")  # 3 input channels
    assert get("encoder/conv_out/kernel") == full  # 512 -> 8 moments
    assert get("decoder/conv_out/kernel") == P(None, None, "tensor", None)
    assert get("encoder/mid_block/attention/attn/out/kernel") == P("tensor", "fsdp")
    assert get("encoder/mid_block/attention/norm/scale") == P(None)


@pytest.mark.slow  # ~25 s on 2 shared cores: kept out of the default run's time budget
def test_full_sdxl_parity_with_diffusers_random_weights():
    """The paper-size architecture (4 blocks, 2 layers, 32 groups) numerically, at 64x64 px."""
    torch.manual_seed(1)
    ref = TorchAutoencoderKL(**SDXL_TORCH).eval()
    model = nnx.eval_shape(lambda: V.AutoencoderKL(V.VARIANTS["sdxl"], rngs=nnx.Rngs(0)))
    VI.load_torch_state_dict(model, {k: v.numpy() for k, v in ref.state_dict().items()})
    x = np.random.RandomState(3).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        dec = _nhwc(ref.decode(post.mean).sample)
    ours = model.encode(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert ours.mean.shape == (1, 8, 8, 4)
    np.testing.assert_allclose(ours.mean, _nhwc(post.mean), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.logvar, _nhwc(post.logvar), atol=1e-4, rtol=0)
    np.testing.assert_allclose(model.decode(ours.mean), dec, atol=1e-4, rtol=0)
