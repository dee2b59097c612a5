"""CLIP image encoder vs transformers' CLIPVisionModelWithProjection (random weights, tiny config)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from fica_jax import sharding as shd
from fica_jax.errors import UserError
from fica_jax.models import clip

HF_TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
)


@pytest.fixture(scope="module")
def torch_clip():
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**HF_TINY)).eval()


def _sd(tm):
    return {k: v.numpy() for k, v in tm.state_dict().items()}


def _pixels(n=2, s=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, s, s, 3)).astype(np.float32)


def _torch_out(tm, x):
    with torch.no_grad():
        return tm(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))


def _ours(tm, **kw):
    cfg = clip.CLIPConfig.from_hf(tm.config.to_dict())
    m = clip.CLIPVisionEncoder(cfg, rngs=nnx.Rngs(1), **kw)
    assert clip.load_hf(m, _sd(tm)).ok
    return m


def test_tiny_variant_is_the_hf_tiny_config(torch_clip):
    assert clip.CLIPConfig.from_hf(torch_clip.config.to_dict()) == clip.VARIANTS["tiny"]
    big = clip.CLIPConfig.from_hf(
        CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            projection_dim=768,
        ).to_dict()
    )
    assert big == clip.VARIANTS["vit-l/14"]


@pytest.mark.heavy
def test_parity_with_transformers(torch_clip):
    x = _pixels()
    ref = _torch_out(torch_clip, x)
    out = _ours(torch_clip)(jnp.asarray(x))
    assert out["image_embeds"].shape == (2, 16)
    assert out["last_hidden_state"].shape == (2, 1 + 16, 32)
    np.testing.assert_allclose(out["image_embeds"], ref.image_embeds.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        out["last_hidden_state"], ref.last_hidden_state.numpy(), atol=1e-4, rtol=0
    )


def test_parity_at_interpolated_size(torch_clip):
    """Other input sizes use resized positions, like transformers' interpolate_pos_encoding
    (jax's bicubic kernel is not torch's, hence the looser tolerance)."""
    x = _pixels(s=24)
    with torch.no_grad():
        ref = torch_clip(
            pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True
        )
    out = _ours(torch_clip)(jnp.asarray(x))
    assert out["last_hidden_state"].shape == (2, 1 + 36, 32)
    np.testing.assert_allclose(out["image_embeds"], ref.image_embeds.numpy(), atol=0.05)


def test_from_pretrained_vision_dir(tmp_path, torch_clip):
    torch_clip.save_pretrained(tmp_path / "vis")
    m = clip.from_pretrained(tmp_path / "vis")
    x = _pixels()
    np.testing.assert_allclose(
        m(jnp.asarray(x))["image_embeds"],
        _torch_out(torch_clip, x).image_embeds.numpy(),
        atol=1e-4,
        rtol=0,
    )


def test_from_pretrained_full_clip_model_dir(tmp_path):
    """A full CLIPModel directory: text tower ignored, top-level projection_dim used."""
    torch.manual_seed(1)
    vis = dict(HF_TINY, projection_dim=99)  # the vision sub-config's own value is not used
    text = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    hf = HFCLIPConfig(vision_config=vis, text_config=text, projection_dim=12)
    full = CLIPModel(hf).eval()
    full.save_pretrained(tmp_path / "full")
    m = clip.from_pretrained(tmp_path / "full")
    assert m.cfg.proj_dim == 12
    x = _pixels()
    with torch.no_grad():
        ref = full.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    ref = getattr(ref, "pooler_output", ref)  # transformers 5 may wrap the features
    np.testing.assert_allclose(m(jnp.asarray(x))["image_embeds"], ref.numpy(), atol=1e-4, rtol=0)


def test_bad_paths_and_mismatched_keys(tmp_path, torch_clip):
    with pytest.raises(UserError, match="missing_dir is not a directory"):
        clip.from_pretrained(tmp_path / "missing_dir")
    (tmp_path / "noconf").mkdir()
    with pytest.raises(UserError, match="noconf/config.json does not exist"):
        clip.from_pretrained(tmp_path / "noconf")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(torch_clip.config.to_dict()))
    with pytest.raises(UserError, match="noweights holds no weights"):
        clip.from_pretrained(tmp_path / "noweights")

    sd = _sd(torch_clip)
    del sd["vision_model.encoder.layers.1.mlp.fc2.bias"]
    sd["vision_model.encoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
    sd["visual_projection.weight"] = np.zeros((8, 32), np.float32)
    m = clip.CLIPVisionEncoder(clip.VARIANTS["tiny"], rngs=nnx.Rngs(0))
    with pytest.raises(UserError) as e:
        clip.load_hf(m, sd)
    msg = str(e.value)
    assert "encoder/blocks/mlp/fc2/bias: blocks [1] absent" in msg
    assert "vision_model.encoder.layers.0.extra.weight" in msg
    assert "proj/kernel: (32, 8) -> (32, 16)" in msg
    assert "1 missing [encoder/blocks/mlp/fc2/bias]" in msg


def test_preprocess_matches_clip_normalisation():
    img = jnp.full((1, 40, 30, 3), 0.5)
    out = clip.preprocess(img, size=16)
    assert out.shape == (1, 16, 16, 3)
    want = (0.5 - np.asarray(clip.CLIP_MEAN)) / np.asarray(clip.CLIP_STD)
    np.testing.assert_allclose(out[0, 8, 8], want, atol=1e-5)
    # the shorter side is resized, the longer one centre-cropped
    ramp = jnp.broadcast_to(jnp.linspace(0, 1, 40)[None, :, None, None], (1, 40, 30, 3))
    out = clip.preprocess(ramp, size=16)
    col = np.asarray(out[0, :, 0, 0]) * clip.CLIP_STD[0] + clip.CLIP_MEAN[0]
    assert 0.05 < col[0] < col[-1] < 0.95  # rows come from the middle of the ramp


def test_bf16_compute_close_to_f32(torch_clip):
    x = jnp.asarray(_pixels())
    f32 = _ours(torch_clip)(x)["image_embeds"]
    bf16 = _ours(torch_clip, dtype=jnp.bfloat16)(x)
    assert bf16["image_embeds"].dtype == jnp.float32
    assert np.isfinite(np.asarray(bf16["image_embeds"])).all()
    np.testing.assert_allclose(bf16["image_embeds"], f32, atol=0.1)
    assert not np.allclose(bf16["image_embeds"], f32, atol=1e-6)  # bf16 really was used


@pytest.mark.heavy
def test_sharded_on_fake_mesh(torch_clip):
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.rules_for("clip")
    cfg = clip.VARIANTS["tiny"]
    model = shd.sharded_init(lambda: clip.CLIPVisionEncoder(cfg, rngs=nnx.Rngs(1)), mesh, rules)
    assert shd.unannotated_params(model) == []
    spec = lambda v: v[...].sharding.spec
    blocks = model.encoder.blocks
    assert spec(blocks.attn.q.kernel) == P(None, "fsdp", "tensor")  # [layers, embed, heads]
    assert spec(blocks.mlp.fc2.kernel) == P(None, "tensor", "fsdp")
    assert spec(model.pos_embed) == P(None, "fsdp")
    assert spec(model.proj.kernel) == P("fsdp", None)
    assert spec(blocks.ln1.scale) == P(None, None)

    ref_model = clip.CLIPVisionEncoder(cfg, rngs=nnx.Rngs(1))  # same init, unsharded
    x = _pixels(n=4)

    @nnx.jit
    def forward(m, x):
        with shd.axis_rules(rules):
            return m(x)["image_embeds"]

    with jax.set_mesh(mesh):
        out = forward(model, shd.put_batch({"x": x}, mesh)["x"])
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(out, ref_model(jnp.asarray(x))["image_embeds"], atol=1e-5)


def test_vit_l14_shapes_abstract():
    m = nnx.eval_shape(lambda: clip.CLIPVisionEncoder(clip.VARIANTS["vit-l/14"], rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert 303e6 < n < 305e6  # CLIP ViT-L/14 vision tower + projection: ~304M
    assert m.encoder.blocks.attn.q.kernel.shape == (24, 1024, 1024)
    assert m.pos_embed.shape == (257, 1024)


def test_vit_l14_golden_specs_on_fsdp_tensor_mesh():
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    m = nnx.eval_shape(lambda: clip.CLIPVisionEncoder(clip.VARIANTS["vit-l/14"], rngs=nnx.Rngs(0)))
    specs = dict(nnx.to_flat_state(shd.param_specs(nnx.state(m), shd.rules_for("clip"), mesh)))
    assert specs[("encoder", "blocks", "attn", "k", "kernel")] == P(None, "fsdp", "tensor")
    assert specs[("encoder", "blocks", "mlp", "fc2", "kernel")] == P(None, "tensor", "fsdp")
    assert specs[("patch_embed", "kernel")] == P(None, None, None, "fsdp")  # [14, 14, 3, 1024]
    assert specs[("class_embedding",)] == P("fsdp")
    assert specs[("proj", "kernel")] == P("fsdp", None)  # [1024, 768]
