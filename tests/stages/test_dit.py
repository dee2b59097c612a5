"""DiT + ControlMLP (fica_jax/models/dit.py) and the `dit` stage (fica_jax/stages/dit.py)."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import dit as dit_configs
from fica_jax import sharding as shd
from fica_jax.models import dit, layers
from fica_jax.stages import dit as dit_stage
from fica_jax.train.stage import get_stage

TINY = dit.VARIANTS["tiny"]  # width 64, depth 2, 4 heads, patch 2, C 16, Cc 8, E 32
B, S = 2, 8  # batch, latent side


def inputs(seed=0, b=B, cfg=TINY):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return dict(
        x=jax.random.normal(k[0], (b, S, S, cfg.in_channels)),
        t=jnp.linspace(10.0, 900.0, b),
        image_emb=jax.random.normal(k[1], (b, cfg.image_emb_dim)),
        domain=jnp.arange(b) % 2,
        control=jax.random.normal(k[2], (b, S, S, cfg.control_channels)),
    )


def perturb(model, seed=0, scale=0.1, skip=None):
    """Adds noise to every param whose path does not contain `skip` (so zero-init layers act)."""
    graphdef, state = nnx.split(model)
    key = jax.random.PRNGKey(seed)

    def one(path, x):
        name = jax.tree_util.keystr(path)
        if skip and skip in name:
            return x
        k = jax.random.fold_in(key, zlib.crc32(name.encode()) % (2**31))
        return x + scale * jax.random.normal(k, x.shape, x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(one, state))


@pytest.fixture(scope="module")
def tiny():
    return dit.DiT(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def trained_like(tiny):
    return perturb(tiny, seed=1)


# ----------------------------------------------------------------------------- pieces
def test_embeddings_and_patching():
    emb = dit.timestep_embedding(jnp.array([0.0, 500.0]), 256)
    assert emb.shape == (2, 256)
    np.testing.assert_array_equal(emb[0], np.r_[np.ones(128), np.zeros(128)])  # [cos, sin] at 0
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    np.testing.assert_allclose(emb[1, :128], np.cos(500 * freqs), atol=1e-4)

    pos = dit.sincos_2d(16, 3, 4)  # 3 rows, 4 columns, row-major tokens
    assert pos.shape == (12, 16)
    grid = pos.reshape(3, 4, 16)
    np.testing.assert_array_equal(grid[0, :, :8], grid[2, :, :8])  # first half: column only
    np.testing.assert_array_equal(grid[:, 0, 8:], grid[:, 3, 8:])  # second half: row only
    np.testing.assert_allclose(grid[0, 1, :4], np.sin(1.0 / 10000 ** (np.arange(4) / 4)))

    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    u = layers.pixel_unshuffle(x, 2)
    assert u.shape == (2, 2, 3, 12)
    np.testing.assert_array_equal(u[1, 1, 2].reshape(2, 2, 3), x[1, 2:4, 4:6])
    np.testing.assert_array_equal(layers.pixel_shuffle(u, 2), x)


@pytest.mark.heavy
def test_module_shapes():
    rngs, kw = nnx.Rngs(0), dict(dtype=jnp.float32, param_dtype=jnp.float32)
    d, n = TINY.width, (S // 2) ** 2
    tok = jnp.ones((B, n, d))
    c = jnp.ones((B, d))
    assert dit.TimestepEmbedder(d, 256, rngs=rngs, **kw)(jnp.ones(B)).shape == (B, d)
    # ControlMLP: the stride-patch conv brings the latent-resolution control to the token grid.
    h = dit.ControlMLP(TINY, rngs=rngs, **kw)(jnp.ones((B, S, S, TINY.control_channels)))
    assert h.shape == (B, n, d)
    p1 = dataclasses.replace(TINY, patch=1)
    assert dit.ControlMLP(p1, rngs=rngs, **kw)(jnp.ones((B, S, S, 8))).shape == (B, S * S, d)
    zc = dit.ZeroControl(d, rngs=rngs, **kw)
    assert zc(tok, c, jnp.zeros(B, bool)).shape == (B, n, d)
    assert (
        dit.DiTBlock(TINY, rngs=rngs, **kw)(tok, c, tok, c, jnp.zeros(B, bool)).shape == tok.shape
    )
    assert dit.FinalLayer(TINY, rngs=rngs, **kw)(tok, c).shape == (B, n, 4 * 16)
    plain = dataclasses.replace(TINY, control_channels=0)
    model = dit.DiT(plain, rngs=rngs)
    a = inputs()
    out = model(a["x"], a["t"], a["image_emb"], a["domain"])
    assert out.shape == a["x"].shape and not hasattr(model, "control_mlp")


# ----------------------------------------------------------------------------- zero init
@pytest.mark.heavy
def test_zero_init_output_and_control_branch(tiny):
    a = inputs()
    out = tiny(**a)
    assert out.shape == a["x"].shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)

    # Everything trained except the ZeroControl blocks: the control input has no effect at all.
    no_ctrl = perturb(tiny, seed=2, skip="['control']")
    out1 = no_ctrl(**a)
    assert float(jnp.abs(out1).max()) > 1e-3
    np.testing.assert_array_equal(out1, no_ctrl(**{**a, "control": a["control"] + 1.0}))
    # ... and once they move, it does.
    full = perturb(no_ctrl, seed=3, scale=0.05)
    delta = full(**{**a, "control": a["control"] + 1.0}) - full(**a)
    assert float(jnp.abs(delta).max()) > 1e-3


def test_drop_uses_null_conditions(trained_like):
    """Dropped rows ignore image embedding and control (CFG); kept rows depend on both."""
    a = inputs()
    drop = jnp.array([True, False])
    other = {**a, "image_emb": a["image_emb"] * -2.0, "control": a["control"] * 3.0}
    o1, o2 = trained_like(**a, drop=drop), trained_like(**other, drop=drop)
    np.testing.assert_allclose(o1[0], o2[0], atol=1e-6)
    assert float(jnp.abs(o1[1] - o2[1]).max()) > 1e-3
    # The domain switcher always acts.
    o3 = trained_like(**{**a, "domain": 1 - a["domain"]}, drop=drop)
    assert float(jnp.abs(o3[0] - o1[0]).max()) > 1e-3


def test_learned_position_embedding():
    cfg = dataclasses.replace(TINY, learned_pos=True, grid=S // 2)
    model = dit.DiT(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(model.pos[...], dit.sincos_2d(64, 4, 4))
    assert model(**inputs()).shape == (B, S, S, 16)


# ----------------------------------------------------------------------------- scale
def test_param_counts():
    paper = layers.num_params(nnx.eval_shape(lambda: dit.build("paper", rngs=nnx.Rngs(0))))
    xl = layers.num_params(nnx.eval_shape(lambda: dit.build("XL", rngs=nnx.Rngs(0))))
    print(f"paper {paper:,} XL {xl:,}")
    assert 1.9e9 <= paper <= 2.1e9
    assert 0.67e9 <= xl <= 0.70e9
    # The scanned stack holds one [28, ...] array per block parameter.
    abstract = nnx.eval_shape(lambda: dit.build("paper", rngs=nnx.Rngs(0)))
    assert abstract.blocks.attn.q.kernel.shape == (28, 1792, 1792)


def test_scan_equals_python_loop(trained_like):
    a = inputs()
    tokens, ctx = trained_like.embed(**a)
    scanned = layers.scan_blocks(trained_like.blocks, tokens, "none", *ctx)
    one_block = nnx.eval_shape(
        lambda: dit.DiTBlock(TINY, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    )
    block_def = nnx.graphdef(one_block)
    stacked = nnx.state(trained_like.blocks)
    x = tokens
    for i in range(TINY.depth):
        block = nnx.merge(block_def, jax.tree.map(lambda v, i=i: v[i], stacked))
        x = block(x, *ctx)
    np.testing.assert_allclose(scanned, x, atol=1e-5)
    assert float(jnp.abs(x - tokens).max()) > 1e-3  # the blocks did something


@pytest.mark.heavy
@pytest.mark.parametrize("remat", ["full", "dots_saveable", "save_attn_mlp_out"])
def test_remat_same_values_and_grads(trained_like, remat):
    state = nnx.state(trained_like)
    a = inputs()
    cfg = dataclasses.replace(trained_like.cfg, remat=remat)
    rem = nnx.merge(nnx.graphdef(dit.DiT(cfg, rngs=nnx.Rngs(0))), state)
    gd, st = nnx.split(rem)  # nnx transforms refuse modules closed over from an outer trace
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(gd, s)(**a))(st))
    assert "remat" in jaxpr  # the blocks really run under jax.checkpoint
    assert "attn_out" in jaxpr and "mlp_out" in jaxpr  # the tags name-based policies keep

    def loss(m):
        return jnp.mean(jnp.square(m(**a)))

    l0, g0 = nnx.value_and_grad(loss)(trained_like)
    l1, g1 = nnx.value_and_grad(loss)(rem)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), g0, g1)


@pytest.mark.heavy
def test_bf16_compute_close_to_f32(trained_like):
    _, state = nnx.split(trained_like)
    bf = nnx.merge(nnx.graphdef(dit.DiT(TINY, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)), state)
    assert bf.blocks.attn.q.kernel[...].dtype == jnp.float32  # params stay f32
    a = inputs()
    ref, out = trained_like(**a), bf(**a)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 3e-2, rel


# ----------------------------------------------------------------------------- sharding
@pytest.mark.heavy
def test_sharding_annotations_and_sharded_forward(trained_like):
    assert shd.unannotated_params(trained_like) == []
    assert trained_like.blocks.attn.q.kernel.get_metadata()["out_sharding"] == (
        shd.LAYERS,
        shd.EMBED,
        shd.HEADS,
    )
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.rules_for("dit")

    def init():  # deterministic, so the unsharded copy has the same values
        return perturb(dit.DiT(TINY, rngs=nnx.Rngs(0)), seed=1)

    model = shd.sharded_init(init, mesh, rules)
    spec = lambda v: v[...].sharding.spec
    # "dit" rules: layers -> None, embed -> fsdp, heads/mlp -> tensor.
    assert spec(model.blocks.attn.q.kernel) == P(None, "fsdp", "tensor")
    assert spec(model.blocks.attn.out.kernel) == P(None, "tensor", "fsdp")
    assert spec(model.blocks.mlp.fc1.kernel) == P(None, "fsdp", "tensor")
    assert spec(model.blocks.mlp.fc2.kernel) == P(None, "tensor", "fsdp")
    assert spec(model.blocks.ada.kernel) == P(None, "fsdp", "tensor")
    assert spec(model.blocks.control.proj.kernel) == P(None, "tensor", "fsdp")
    assert spec(model.control_mlp.conv_down.kernel) == P(None, None, None, "fsdp")
    expected = shd.param_specs(nnx.state(model, nnx.Param), rules, mesh)
    got = jax.tree.map(lambda v: v.sharding.spec, nnx.state(model, nnx.Param))
    assert jax.tree.leaves(got) == jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, P))

    a = inputs(b=4)
    ref = init()(**a)
    with jax.set_mesh(mesh), shd.axis_rules(rules):
        batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in a.items()}
        out = nnx.jit(lambda m, b: m(**b))(model, batch)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.heavy
def test_control_concat_sharded_equals_unsharded_and_drops_with_the_condition():
    """`control_concat`: the control reaches the tokens from the first step (a fresh model's
    output is 0, the patch embedding is not: its tokens change with the control), the sharded
    forward equals the unsharded one, and `drop` removes it with the other conditions."""
    cfg = dataclasses.replace(TINY, control_concat=True)
    init = lambda: perturb(dit.DiT(cfg, rngs=nnx.Rngs(0)), seed=2)
    a = inputs(b=4, cfg=cfg)
    fresh = dit.DiT(cfg, rngs=nnx.Rngs(0))
    tok = lambda **kw: fresh.embed(**{**a, **kw})[0]
    assert float(jnp.abs(tok() - tok(control=a["control"] + 1.0)).max()) > 1e-3
    ref = init()(**a)
    other = {**a, "control": a["control"] * -3.0}
    assert float(jnp.abs(init()(**other) - ref).max()) > 1e-3
    drop = jnp.ones((4,), bool)
    np.testing.assert_allclose(init()(**a, drop=drop), init()(**other, drop=drop), atol=1e-6)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.rules_for("dit")
    model = shd.sharded_init(init, mesh, rules)
    with jax.set_mesh(mesh), shd.axis_rules(rules):
        batch = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim)) for k, v in a.items()}
        out = nnx.jit(lambda m, b: m(**b))(model, batch)
    np.testing.assert_allclose(out, ref, atol=1e-5)


# ----------------------------------------------------------------------------- stage
@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    from latent_fixture import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path_factory.mktemp("latents") / "cache")
    cfg = dit_configs.get_config("tiny")
    with cfg.unlocked():
        cfg.data.dir = str(cache)
        cfg.model.uv_resolution = 16  # the fixture's (the stage's fit_data in a real run)
    return cfg


@pytest.mark.heavy
def test_stage_data_and_spec(tiny_cfg):
    cfg = tiny_cfg
    stage = get_stage("dit")
    assert stage.name == "dit" and stage.rules == "dit"
    it = iter(stage.make_data(cfg, "train", 0, 1))
    first = next(it)
    state = it.get_state()
    second = next(it)
    spec = stage.batch_spec(cfg)
    assert {k: (v.shape, v.dtype) for k, v in first.items()} == {
        k: (s.shape, s.dtype) for k, s in spec.items()
    }
    it2 = iter(stage.make_data(cfg, "train", 0, 1))
    it2.set_state(state)
    resumed = next(it2)
    for k in second:
        np.testing.assert_array_equal(resumed[k], second[k])
    # Two hosts split the batch and see different records.
    h0 = next(iter(stage.make_data(cfg, "train", 0, 2)))
    h1 = next(iter(stage.make_data(cfg, "train", 1, 2)))
    assert h0["tex_latent"].shape[0] == cfg.data.batch_size // 2
    assert not np.allclose(h0["tex_latent"], h1["tex_latent"])

    paper = dit_configs.get_config("paper")
    ps = dit_stage.batch_spec(paper)
    assert ps["tex_latent"].shape == (128, 32, 32, 16) and ps["control"].shape[:3] == (128, 32, 32)
    assert (paper.mesh.data, paper.mesh.fsdp) == (2, 32) and paper.train.compute_dtype == "bfloat16"
    m = dit_stage.dit_config(paper)
    assert (m.width, m.depth, m.heads, m.patch, m.width // m.heads) == (1792, 28, 28, 2, 64)


@pytest.mark.heavy
def test_train_steps_reduce_loss(tiny_cfg):
    """A few Adam steps of the stage loss on one fixed batch (and fixed noise) reduce it."""
    cfg = tiny_cfg
    stage = get_stage("dit")
    model = stage.make_model(cfg, nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in next(iter(stage.make_data(cfg, "train", 0, 1))).items()}
    rng = jax.random.PRNGKey(3)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        (loss, aux), grads = nnx.value_and_grad(stage.make_loss(cfg), has_aux=True)(
            model, batch, rng
        )
        opt.update(model, grads)
        return loss, aux

    losses = [float(step(model, opt)[0]) for _ in range(8)]
    print("dit tiny losses", losses)
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0]
    _, aux = step(model, opt)
    assert set(aux) >= {"loss_texture", "loss_geometry", "drop_frac"}


@pytest.mark.parametrize("control_input", ["latents", "pixels"])
def test_ablation_switches_pick_control_groups_and_embedding(tiny_cfg, control_input):
    """The paper's ablations from one cache: RGB-only control, and no image embedding; the
    control either the VAE-encoded groups or the maps space-to-depth onto the latent grid."""
    from data_pipelines.latents import LatentSource, pixel_control
    from fica_jax.config import apply_overrides

    full_cfg = tiny_cfg.copy_and_resolve_references()
    apply_overrides(full_cfg, [f"--config.model.control_input={control_input}"])
    cfg = full_cfg.copy_and_resolve_references()
    apply_overrides(
        cfg, ["--config.model.control_maps=('rgb', 'mask')", "--config.model.use_image_emb=false"]
    )
    stage = get_stage("dit")
    batch = next(iter(stage.make_data(cfg, "train", 0, 1)))
    full = next(iter(stage.make_data(full_cfg, "train", 0, 1)))
    c = cfg.model.latent_channels
    if control_input == "latents":
        want, want_full = 2 * c, 4 * c
        np.testing.assert_array_equal(batch["control"], full["control"][..., : 2 * c])
    else:  # 16^2 maps onto the 8^2 grid: 2x2 texels of (rgb 3 + mask 1) / of all 10 channels
        want, want_full = 4 * 4, 4 * 10
        rec = LatentSource(cfg.data.dir, "train")
        ids = [str(rec[i]["identity"]) for i in range(len(rec))]
        # the first example's maps, through the same space-to-depth, by identity
        first = next(i for i in range(len(rec)) if np.array_equal(
            pixel_control(rec[i]["control_maps"], ("rgb", "mask", "nrm", "vtx"), 8),
            full["control"][0]))  # fmt: skip
        assert ids[first]
        maps = np.asarray(rec[first]["control_maps"], np.float32)
        np.testing.assert_array_equal(full["control"][0][0, 0, :10], maps[0, 0])  # texel (0, 0)
        np.testing.assert_array_equal(full["control"][0][0, 0, 10:20], maps[0, 1])  # (0, 1)
        np.testing.assert_array_equal(full["control"][0][0, 0, 20:30], maps[1, 0])  # (1, 0)
    assert batch["control"].shape[-1] == want and full["control"].shape[-1] == want_full
    assert not batch["image_emb"].any() and full["image_emb"].any()
    assert stage.batch_spec(cfg)["control"].shape[-1] == want
    assert dit_stage.dit_config(cfg).control_channels == want


@pytest.mark.heavy
def test_embedding_noise_scales_with_each_embedding_and_spares_a_zeroed_one(tiny_cfg):
    """`model.emb_noise` (conditioning augmentation): the loss sees each portrait's embedding
    plus Gaussian noise at emb_noise x its RMS; 0 leaves it exact, a zeroed embedding (the
    no-embedding ablations) stays zero."""
    from fica_jax.config import apply_overrides

    stage = get_stage("dit")
    batch = {
        k: jnp.asarray(v) for k, v in next(iter(stage.make_data(tiny_cfg, "train", 0, 1))).items()
    }
    clean = batch["image_emb"]

    def seen(*overrides, zero=False):
        cfg = tiny_cfg.copy_and_resolve_references()
        apply_overrides(cfg, list(overrides))
        got = []

        def model(x_s, t, image_emb, domain, control, drop):
            got.append(image_emb)
            return jnp.zeros_like(x_s)

        b = {**batch, "image_emb": jnp.zeros_like(clean)} if zero else batch  # as the data gives
        stage.make_loss(cfg)(model, b, jax.random.PRNGKey(0))
        return np.asarray(got[0][: clean.shape[0]])

    np.testing.assert_array_equal(seen("--config.model.emb_noise=0.0"), clean)
    noisy = seen("--config.model.emb_noise=0.5")
    rms = np.sqrt(np.mean(np.square(np.asarray(clean)), axis=-1, keepdims=True))
    z = (noisy - np.asarray(clean)) / rms
    assert 0.4 < z.std() < 0.6 and abs(z.mean()) < 0.1, (z.std(), z.mean())
    zeroed = seen("--config.model.emb_noise=0.5", "--config.model.use_image_emb=false", zero=True)
    assert not zeroed.any()
