"""Sapiens ViT backbone, dense heads and the Sapiens checkpoint key map vs PyTorch references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformers import ViTConfig as HFViTConfig
from transformers import ViTModel

from fica_jax import sharding as shd
from fica_jax.errors import UserError
from fica_jax.models import dense_heads, vit

TINY = vit.VARIANTS["tiny"]  # width 32, depth 2, heads 2, 64x48 input -> 4x3 tokens


@pytest.fixture(scope="module")
def hf_vit():
    torch.manual_seed(0)
    cfg = HFViTConfig(
        hidden_size=TINY.width,
        num_hidden_layers=TINY.depth,
        num_attention_heads=TINY.heads,
        intermediate_size=4 * TINY.width,
        image_size=TINY.image_size,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )
    return ViTModel(cfg, add_pooling_layer=False).eval()


def hf_vit_to_sapiens(tm) -> dict[str, np.ndarray]:
    """Re-lays a transformers ViT state dict out with Sapiens' mmpretrain key names (fused qkv,
    `ffn.layers.0.0`, final `ln1`, pos_embed with a class slot, cls_token)."""
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    out = {
        "backbone.cls_token": sd["embeddings.cls_token"],
        "backbone.pos_embed": sd["embeddings.position_embeddings"],
        "backbone.ln1.weight": sd["layernorm.weight"],
        "backbone.ln1.bias": sd["layernorm.bias"],
    }
    for kind in ("weight", "bias"):
        out[f"backbone.patch_embed.projection.{kind}"] = sd[
            f"embeddings.patch_embeddings.projection.{kind}"
        ]
    for i in range(tm.config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"backbone.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{src}attention.{n}_proj.{kind}"] for n in "qkv"]
            out[f"{dst}attn.qkv.{kind}"] = np.concatenate(qkv, axis=0)
            for a, b in (
                ("attention.o_proj", "attn.proj"),
                ("layernorm_before", "ln1"),
                ("layernorm_after", "ln2"),
                ("mlp.fc1", "ffn.layers.0.0"),
                ("mlp.fc2", "ffn.layers.1"),
            ):
                out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
    return out


class TorchVitHead(torch.nn.Module):
    """Sapiens' mmseg VitHead layout (decode_heads/vit_head.py) with plain torch modules."""

    def __init__(self, cin, ch, out, convs):
        super().__init__()
        dl = []
        for c in (cin, ch, ch):
            dl += [torch.nn.ConvTranspose2d(c, ch, 4, 2, 1, bias=False)]
            dl += [torch.nn.InstanceNorm2d(ch), torch.nn.SiLU()]
        self.deconv_layers = torch.nn.Sequential(*dl)
        cl = []
        for _ in range(convs):
            cl += [torch.nn.Conv2d(ch, ch, 1), torch.nn.InstanceNorm2d(ch), torch.nn.SiLU()]
        self.conv_layers = torch.nn.Sequential(*cl)
        self.conv_seg = torch.nn.Conv2d(ch, out, 1)

    def forward(self, x):
        y = self.conv_seg(self.conv_layers(self.deconv_layers(x)))
        return torch.nn.functional.interpolate(y, scale_factor=2, mode="bilinear")


def _images(n=2, hw=(64, 48), seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, *hw, 3)).astype(np.float32)


@pytest.mark.heavy
def test_backbone_parity_with_transformers_via_sapiens_keys(hf_vit):
    """The Sapiens key map, fed a state dict re-laid out from transformers' ViTModel, gives the
    same patch tokens as ViTModel run with the class token masked out of attention."""
    model = vit.ViT(TINY, rngs=nnx.Rngs(1))
    report = vit.load_sapiens(model, hf_vit_to_sapiens(hf_vit))
    assert report.ok and report.loaded == 21
    x = np.random.default_rng(0).standard_normal((2, 64, 48, 3)).astype(np.float32)
    mask = torch.ones(2, 1 + 12, dtype=torch.long)
    mask[:, 0] = 0  # no class token in Sapiens: patch tokens must not attend to it
    with torch.no_grad():
        ref = hf_vit(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)), attention_mask=mask)
    ref = ref.last_hidden_state[:, 1:].numpy().reshape(2, 4, 3, TINY.width)
    out = model(jnp.asarray(x))
    assert out.shape == (2, 4, 3, TINY.width)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.heavy
def test_dense_head_parity_with_sapiens_vithead():
    cfg = dataclasses.replace(TINY, head_convs=1)
    torch.manual_seed(2)
    th = TorchVitHead(cfg.width, cfg.head_channels, 3, convs=1).eval()
    model = vit.DensePredictor(cfg, rngs=nnx.Rngs(0))
    before = np.asarray(model.uv.final.kernel[...])
    sd = {f"decode_head.{k}": v.numpy() for k, v in th.state_dict().items()}
    # a head-only state dict: non-strict, so the (absent) backbone stays at its init
    report = vit.load_sapiens(model, sd, head="nrm", strict=False)
    assert report.loaded == len(sd)  # every head tensor landed
    np.testing.assert_array_equal(model.uv.final.kernel[...], before)  # other heads untouched
    feats = np.random.default_rng(1).standard_normal((2, 4, 3, cfg.width)).astype(np.float32)
    with torch.no_grad():
        ref = th(torch.from_numpy(feats.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    out = model.nrm(jnp.asarray(feats))
    assert out.shape == ref.shape == (2, 64, 48, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def _value_and_grads(f):
    """jit((x, k, cotangent) -> (f(x, k), d/dx, d/dk)): one compile per shape."""

    def run(x, k, ct):
        y, vjp = jax.vjp(f, x, k)
        return (y, *vjp(ct))

    return jax.jit(run)


@pytest.mark.heavy
@pytest.mark.parametrize("hw", [(5, 3), (1, 2)])
def test_subpixel_upsample_equals_conv_transpose_with_gradients(hw):
    """The sub-pixel x2 layer equals the zero-dilated nnx.ConvTranspose it replaced: same
    parameter and init, same output, same gradients wrt input and kernel (odd sizes too)."""
    cin, cout = 3, 5
    ref = nnx.ConvTranspose(
        cin, cout, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), use_bias=False,
        kernel_init=dense_heads._DECONV_INIT, rngs=nnx.Rngs(4),
    )  # fmt: skip
    layer = dense_heads.ConvTransposeX2(cin, cout, rngs=nnx.Rngs(4))
    np.testing.assert_array_equal(layer.kernel[...], ref.kernel[...])  # checkpoints unchanged
    keys = jax.random.split(jax.random.key(0), 3)
    kernel = jax.random.normal(keys[0], (4, 4, cin, cout))
    x = jax.random.normal(keys[1], (2, *hw, cin))
    ct = jax.random.normal(keys[2], (2, 2 * hw[0], 2 * hw[1], cout))
    graphdef = nnx.graphdef(ref)
    want = _value_and_grads(lambda x, k: nnx.merge(graphdef, {"kernel": k})(x))(x, kernel, ct)
    assert want[0].shape == (2, 2 * hw[0], 2 * hw[1], cout)
    for impl in ("conv", "dot"):
        f = lambda x, k, impl=impl: dense_heads.upsample_conv_x2(x, k, impl)
        got = _value_and_grads(f)(x, kernel, ct)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)
        for g, g_ref in zip(got[1:], want[1:], strict=True):  # d/dx, d/dkernel
            np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-5)
    layer.kernel.set_value(kernel)
    np.testing.assert_allclose(layer(x), want[0], atol=1e-5, rtol=0)  # the default impl
    with pytest.raises(ValueError, match="unknown impl"):
        dense_heads.upsample_conv_x2(x, kernel, "fft")


@pytest.mark.heavy
def test_dense_predictor_outputs_and_other_input_sizes():
    model = vit.DensePredictor(TINY, rngs=nnx.Rngs(0))
    out = model(jnp.asarray(_images()))
    assert {k: v.shape for k, v in out.items()} == {
        "uv": (2, 64, 48, 2),
        "vtx": (2, 64, 48, 3),
        "nrm": (2, 64, 48, 3),
        "mask_logits": (2, 64, 48, 1),
        "pooled": (2, TINY.width),
    }
    feats = model.backbone(vit.normalize(jnp.asarray(_images())))
    np.testing.assert_allclose(out["pooled"], feats.mean(axis=(1, 2)), atol=1e-6)
    # any multiple of 16: positions are interpolated from the 4x3 grid
    out = model(jnp.asarray(_images(1, (96, 32))))
    assert out["uv"].shape == (1, 96, 32, 2)
    assert np.isfinite(np.asarray(out["uv"])).all()


def test_pos_embed_import_drops_class_slot_and_resizes():
    gh, gw = TINY.grid
    pos = np.random.default_rng(0).standard_normal((1, 1 + gh * gw, 8)).astype(np.float32)
    same = vit.import_pos_embed(pos, TINY, "pos_embed")
    np.testing.assert_array_equal(same, pos[0, 1:])  # class slot removed, grid unchanged
    square = np.random.default_rng(1).standard_normal((1, 1 + 36, 8)).astype(np.float32)
    resized = vit.import_pos_embed(square, TINY, "pos_embed")  # 6x6 pretrain grid -> 4x3
    assert resized.shape == (gh * gw, 8)
    # a constant grid stays constant under bicubic resizing
    const = np.ones((1, 36, 8), np.float32)
    np.testing.assert_allclose(vit.import_pos_embed(const, TINY, "pos_embed"), 1.0, atol=1e-5)
    with pytest.raises(UserError, match="neither the 4x3 grid"):
        vit.import_pos_embed(np.zeros((1, 10, 8), np.float32), TINY, "backbone.pos_embed")


def test_sapiens_key_report_and_bad_path(tmp_path, hf_vit):
    sd = hf_vit_to_sapiens(hf_vit)
    del sd["backbone.layers.1.ln2.bias"]
    sd["backbone.layers.0.attn.gamma"] = np.zeros(3, np.float32)
    sd["data_preprocessor.mean"] = np.zeros(3, np.float32)
    sd["backbone.ln1.weight"] = np.zeros(7, np.float32)
    with pytest.raises(UserError) as e:
        vit.load_sapiens(vit.ViT(TINY, rngs=nnx.Rngs(0)), sd)
    msg = str(e.value)
    assert "encoder/blocks/ln2/bias: blocks [1] absent" in msg
    assert "backbone.layers.0.attn.gamma" in msg and "data_preprocessor.mean" in msg
    assert "norm/scale: (7,) -> (32,)" in msg
    # a .pth file on disk (mmpretrain wrapper) loads; a missing one is named
    good = hf_vit_to_sapiens(hf_vit)
    torch.save(
        {"state_dict": {k: torch.from_numpy(v) for k, v in good.items()}}, tmp_path / "s.pth"
    )
    assert vit.load_sapiens(vit.ViT(TINY, rngs=nnx.Rngs(0)), tmp_path / "s.pth").ok
    with pytest.raises(UserError, match="sapiens_1b.pth does not exist"):
        vit.load_sapiens(vit.ViT(TINY, rngs=nnx.Rngs(0)), tmp_path / "sapiens_1b.pth")
    with pytest.raises(UserError, match="unknown dense head 'rgb'"):
        vit.load_sapiens(vit.DensePredictor(TINY, rngs=nnx.Rngs(0)), good, head="rgb")


@pytest.mark.heavy
def test_bf16_compute_close_to_f32():
    x = jnp.asarray(_images())
    f32 = vit.DensePredictor(TINY, rngs=nnx.Rngs(0))(x)
    bf = vit.DensePredictor(TINY, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)(x)
    for k in ("uv", "pooled"):
        assert bf[k].dtype == jnp.float32 and np.isfinite(np.asarray(bf[k])).all()
        np.testing.assert_allclose(bf[k], f32[k], atol=0.15)
    assert not np.allclose(bf["pooled"], f32["pooled"], atol=1e-6)  # bf16 really was used


@pytest.mark.heavy
def test_scan_compiles_one_block_and_remat_keeps_gradients():
    cfg = dataclasses.replace(TINY, depth=3)
    model = vit.ViT(cfg, rngs=nnx.Rngs(0))
    assert model.encoder.blocks.attn.q.kernel.shape == (3, 32, 32)
    x = jnp.asarray(vit.normalize(jnp.asarray(_images(1))))
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    assert "length=3" in jaxpr and jaxpr.count("dot_general") < 20  # one block body, scanned

    loss = lambda m: jnp.sum(m(x) ** 2)
    g0 = nnx.grad(loss)(model)
    model_r = vit.ViT(dataclasses.replace(cfg, remat="full"), rngs=nnx.Rngs(0))
    g1 = nnx.grad(loss)(model_r)
    np.testing.assert_allclose(
        g0.encoder.blocks.mlp.fc1.kernel[...], g1.encoder.blocks.mlp.fc1.kernel[...], atol=1e-5
    )


@pytest.mark.heavy
def _sharded_forward(model, images, mesh, rules):
    """`model(images)` jitted on `mesh` with the images batch-sharded."""

    @nnx.jit
    def forward(m, x):
        with shd.axis_rules(rules):
            return m(shd.constrain(x, shd.BATCH, shd.HEIGHT, shd.WIDTH, shd.CHANNELS))

    with jax.set_mesh(mesh):
        return forward(model, shd.put_batch({"x": np.asarray(images)}, mesh)["x"])


def test_sharded_on_fake_mesh():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    rules = shd.rules_for("vit")
    # The heads' layout is read from abstract shapes (cheap); the backbone is really sharded.
    abstract = nnx.eval_shape(lambda: vit.DensePredictor(TINY, rngs=nnx.Rngs(3)))
    assert shd.unannotated_params(abstract) == []
    specs = dict(nnx.to_flat_state(shd.param_specs(nnx.state(abstract), rules, mesh)))
    assert specs[("uv", "deconvs", 1, "kernel")] == P(None, None, None, "fsdp")
    assert specs[("mask_logits", "final", "kernel")] == P(None, None, None, None)  # 1 output

    model = shd.sharded_init(lambda: vit.ViT(TINY, rngs=nnx.Rngs(3)), mesh, rules)
    spec = lambda v: v[...].sharding.spec
    blocks = model.encoder.blocks
    # [layers, embed, heads]; the tensor axis has size 1 on this mesh
    assert spec(blocks.attn.q.kernel) == P(None, "fsdp", "tensor")
    assert spec(blocks.mlp.fc2.kernel) == P(None, "tensor", "fsdp")
    assert spec(model.pos_embed) == P(None, "fsdp")
    assert spec(model.patch_embed.kernel) == P(None, None, None, "fsdp")
    assert spec(blocks.ln1.scale) == P(None, None)
    assert len({s.device for s in blocks.attn.q.kernel[...].addressable_shards}) == 8

    x = vit.normalize(jnp.asarray(_images(n=8)))
    out = _sharded_forward(model, x, mesh, rules)
    assert out.sharding.spec[0] == ("data", "fsdp")
    ref = vit.ViT(TINY, rngs=nnx.Rngs(3))(x)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.heavy
def test_dense_predictor_with_pixel_branch_sharded_equals_unsharded():
    """The tiny config's `pixel_branch` (a U-Net beside the tokens, read by every head's last
    conv): the maps keep their shapes, and the sharded forward equals the unsharded one."""
    cfg = dataclasses.replace(TINY, pixel_branch=8, head_channels=16)
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    rules = shd.rules_for("vit")
    init = lambda: vit.DensePredictor(cfg, rngs=nnx.Rngs(5))
    images = jnp.asarray(_images(n=8))
    ref = init()(images)
    plain = vit.DensePredictor(dataclasses.replace(cfg, pixel_branch=0), rngs=nnx.Rngs(5))(images)
    assert ref["uv"].shape == plain["uv"].shape == (8, 64, 48, 2)
    out = _sharded_forward(shd.sharded_init(init, mesh, rules), images, mesh, rules)
    for k in ("uv", "vtx", "nrm", "mask_logits"):
        np.testing.assert_allclose(out[k], ref[k], atol=1e-4, err_msg=k)


@pytest.mark.parametrize(
    "name,lo,hi", [("0.3b", 0.30e9, 0.31e9), ("1b", 1.12e9, 1.14e9), ("2b", 2.1e9, 2.2e9)]
)
def test_variant_sizes_abstract(name, lo, hi):
    m = nnx.eval_shape(lambda: vit.ViT(vit.VARIANTS[name], rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert lo < n < hi, n
    assert m.pos_embed.shape == (64 * 48, vit.VARIANTS[name].width)


def test_sapiens_1b_golden_specs_on_fsdp_tensor_mesh():
    """Paper-scale layout (Sapiens-1B at 1024x768), from abstract shapes only."""
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    model = nnx.eval_shape(lambda: vit.DensePredictor(vit.VARIANTS["1b"], rngs=nnx.Rngs(0)))
    assert shd.unannotated_params(model) == []
    specs = dict(nnx.to_flat_state(shd.param_specs(nnx.state(model), shd.rules_for("vit"), mesh)))
    blocks = ("backbone", "encoder", "blocks")
    assert specs[(*blocks, "attn", "q", "kernel")] == P(None, "fsdp", "tensor")  # [40, 1536, 1536]
    assert specs[(*blocks, "attn", "out", "kernel")] == P(None, "tensor", "fsdp")
    assert specs[(*blocks, "mlp", "fc1", "kernel")] == P(None, "fsdp", "tensor")  # [40, 1536, 6144]
    assert specs[(*blocks, "mlp", "fc1", "bias")] == P(None, "tensor")
    assert specs[(*blocks, "ln1", "scale")] == P(None, None)
    assert specs[("backbone", "pos_embed")] == P(None, "fsdp")  # [3072, 1536]
    assert specs[("nrm", "deconvs", 0, "kernel")] == P(None, None, None, "fsdp")  # [4,4,1536,768]
    assert specs[("nrm", "final", "kernel")] == P(None, None, None, None)  # 3 outputs


def test_task_head_with_other_classes_loads_non_strict(hf_vit):
    """A Sapiens seg head (28 classes) into our 1-channel mask head: deconvs are taken, the
    mismatched conv_seg is reported and our final conv kept."""
    torch.manual_seed(3)
    th = TorchVitHead(TINY.width, TINY.head_channels, 28, convs=0)
    sd = {f"decode_head.{k}": v.numpy() for k, v in th.state_dict().items()}
    sd |= hf_vit_to_sapiens(hf_vit)
    model = vit.DensePredictor(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match=r"final/kernel: \(1, 1, 16, 28\) -> \(1, 1, 16, 1\)"):
        vit.load_sapiens(model, sd, head="mask_logits")
    report = vit.load_sapiens(model, sd, head="mask_logits", strict=False)
    assert report.loaded == 21 + 3 and len(report.mismatched) == 2  # conv_seg weight and bias
    want = th.deconv_layers[3].weight.detach().numpy()[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
    np.testing.assert_array_equal(model.mask_logits.deconvs[1].kernel[...], want)
