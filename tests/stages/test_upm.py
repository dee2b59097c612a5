"""UPM (FiCA Sec. 2.4): model shapes and sharding, the stage's step and eval, the Avatar."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.pipeline import first_batch, open_source
from fica_jax import sharding as shd
from fica_jax.avatar.bundle import Avatar
from fica_jax.commands.main import main
from fica_jax.config import load_config
from fica_jax.models import upm, upm_geometry
from fica_jax.render import ply, tiles
from fica_jax.render.project import covariance, project, quat_to_rotmat, rotmat_to_quat
from fica_jax.render.surfels import render_surfels, surfel_gaussians
from fica_jax.stages import upm as upm_stage
from fica_jax.train import loop
from fica_jax.train.stage import get_stage
from fica_jax.train.step import build

# the tiny config's model (configs/upm.py:tiny): every test builds this one, so the eager
# per-shape init compiles are paid once per process
BASE = dataclasses.replace(upm.VARIANTS["tiny"], n_cameras=8)


def _inputs(b=8, r=32, e=18, seed=0):
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[:r, :r] / r
    geo = np.stack([xx - 0.5, yy - 0.5, 0.1 * np.sin(6 * xx)], -1) * 0.2
    cam = np.eye(4, dtype=np.float32)
    cam[2, 3] = 0.6
    return {
        "texture": rs.uniform(0, 1, (b, r, r, 3)).astype(np.float32),
        "geometry": np.broadcast_to(geo, (b, r, r, 3)).astype(np.float32),
        "mask": np.broadcast_to((xx > 0.1) & (yy > 0.1), (b, r, r)).astype(np.float32),
        "expression": rs.uniform(0, 1, (b, e)).astype(np.float32),
        "viewmat": np.broadcast_to(cam, (b, 4, 4)).copy(),
        "gaze": rs.uniform(-0.2, 0.2, (b, 2)).astype(np.float32),
    }


def _new(cfg=BASE):
    return upm.UPM(cfg, rngs=nnx.Rngs(0))


def _call(model, x, **kw):
    keys = ("texture", "geometry", "mask", "expression", "viewmat", "gaze")
    return model(*(x[k] for k in keys), **kw)


def _cfg(synth_dir, *extra):
    return load_config(
        "configs/upm.py:tiny",
        [
            f"--config.data.dir={synth_dir}",
            "--config.data.image_size=32",
            "--config.mesh.data=2",
            "--config.mesh.fsdp=4",
            *extra,
        ],
    )


@pytest.mark.heavy
def test_shapes_annotations_and_zero_identity():
    model = _new()
    assert shd.unannotated_params(model) == []
    x = {k: jnp.asarray(v) for k, v in _inputs(b=2).items()}
    fwd = nnx.jit(_call, static_argnames="zero_identity")  # eager convs dispatch op by op
    g, kl = fwd(model, x)
    shapes = {k: v.shape for k, v in g.items()}
    assert shapes == {
        "means": (2, 32, 32, 3),
        "quats": (2, 32, 32, 4),
        "scales": (2, 32, 32, 3),
        "opacities": (2, 32, 32),
        "colors": (2, 32, 32, 3),
    }
    assert kl.shape == (2,) and bool(jnp.all(kl >= 0))
    np.testing.assert_allclose(jnp.linalg.norm(g["quats"], axis=-1), 1.0, atol=1e-5)
    assert float(jnp.abs(g["opacities"] * (1 - x["mask"])).max()) == 0.0  # outside the atlas
    assert 0 < float(g["scales"].min()) and float(g["scales"].max()) < BASE.max_scale
    # an untrained decoder renders the neutral, textured head (small offsets)
    assert float(jnp.abs(g["means"] - x["geometry"]).max()) < 0.02
    g0, _ = fwd(model, x, zero_identity=True)
    assert float(jnp.abs(g0["means"] - g["means"]).max()) > 1e-5
    assert float(jnp.abs(g0["colors"] - g["colors"]).max()) > 1e-5
    ident = nnx.jit(lambda m, x: m.encode_identity(x["texture"], x["geometry"], x["mask"]))(
        model, x
    )
    assert [b.shape for b in ident["biases"]] == [(2, 8, 8, 48), (2, 16, 16, 48), (2, 32, 32, 32)]
    # the camera colour correction starts at identity
    np.testing.assert_allclose(model.correct_colors(g["colors"], jnp.array([1, 3])), g["colors"])
    with pytest.raises(ValueError, match="uv_resolution"):
        upm.UPM(dataclasses.replace(BASE, uv_resolution=64), rngs=nnx.Rngs(0))


@pytest.mark.heavy
def test_surface_frames_are_the_surfel_proxy():
    """On a tilted plane (orthogonal tangents) the UPM's frames give exactly the surfels'
    covariance, and an untrained UPM renders a capture identity like the surfel proxy."""
    a, b = np.asarray([0.004, 0.001, 0.0]), np.asarray([0.0, 0.002, 0.003])
    b = b - a * (a @ b) / (a @ a)  # orthogonal to a
    yy, xx = np.mgrid[:8, :8].astype(np.float32)
    geo = (xx[..., None] * a + yy[..., None] * b).astype(np.float32)[None]
    mask = np.ones((1, 8, 8), np.float32)
    quat, std = upm_geometry.surface_frames(jnp.asarray(geo), jnp.asarray(mask), 0.5, 0.1)
    ours = covariance(quat, std)[0]
    ref = surfel_gaussians(jnp.zeros((8, 8, 3)), jnp.asarray(geo[0]), mask[0])["covars"]
    np.testing.assert_allclose(ours.reshape(-1, 3, 3), ref, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(jnp.linalg.norm(quat, axis=-1), 1.0, atol=1e-6)
    # rotmat_to_quat inverts quat_to_rotmat (any rotation, up to sign)
    q = jax.random.normal(jax.random.PRNGKey(0), (500, 4))
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    back = rotmat_to_quat(quat_to_rotmat(q))
    np.testing.assert_allclose(jnp.abs(jnp.sum(q * back, -1)), 1.0, atol=1e-5)


@pytest.mark.heavy
def test_untrained_upm_renders_the_surfel_proxy(synth_dir):
    rec, v = open_source(synth_dir, "test")[0], 1
    one = lambda a: jnp.asarray(a, jnp.float32)[None]
    tex, geo, mask = rec["uv_texture"] / 255.0, rec["uv_geometry"], rec["uv_mask"]
    cam = (one(rec["view_viewmat"][v]), one(rec["view_K"][v]))
    g, _ = nnx.jit(_call)(
        _new(),
        {"texture": one(tex), "geometry": one(geo), "mask": one(mask),
         "expression": one(rec["view_expression"][v]), "viewmat": cam[0],
         "gaze": one(rec["view_gaze"][v])},
    )  # fmt: skip
    ours = upm.render_batch(g, *cam, 32, 32, eps2d=BASE.eps2d)
    ref = render_surfels(tex, geo, *cam, 32, 32, mask=mask, normal=rec["uv_normal"])
    assert float(ref["alpha"].max()) > 0.9
    assert float(jnp.abs(ours["image"] - ref["image"]).mean()) < 0.01
    assert float(jnp.abs(ours["alpha"] - ref["alpha"]).mean()) < 0.01


@pytest.mark.heavy
def test_gaze_turns_only_the_eyeballs_as_the_capture_does(synth_dir):
    """Explicit eyes: with the decoder's offsets at zero, the gaze-turned neutral eye texels land
    on the dome frame's posed eye texels (the capture turns its eyeballs by the same gaze); no
    texel outside the eyeballs moves with the gaze."""
    rec, v = open_source(synth_dir, "train")[0], 1
    geo, mask = jnp.asarray(rec["uv_geometry"])[None], jnp.asarray(rec["uv_mask"])[None]
    eyes = upm.eye_masks(BASE)
    assert eyes.shape == (2, 32, 32) and float(eyes.sum()) > 20
    centres = upm_geometry.eye_centres(geo, mask, eyes)
    quats = jnp.broadcast_to(jnp.asarray([1.0, 0, 0, 0]), (1, 32, 32, 4))
    gaze = jnp.asarray(rec["view_gaze"][v])[None]
    turned, _ = upm_geometry.turn_eyes(geo, quats, eyes, centres, gaze)
    posed = rec["view_uv_geometry"][v]
    inside = np.asarray((eyes.sum(0) > 0) & (mask[0] > 0.5))
    moved = np.linalg.norm(posed - rec["uv_geometry"], axis=-1)[inside]
    err = np.linalg.norm(np.asarray(turned[0]) - posed, axis=-1)[inside]
    assert moved.mean() > 1e-3 and err.mean() < 0.15 * moved.mean(), (moved.mean(), err.mean())
    # through the whole model: only eye texels change with the gaze
    model, x = _new(), {k: jnp.asarray(a) for k, a in _inputs(b=2).items()}
    fwd = nnx.jit(_call)
    x["geometry"] = jnp.broadcast_to(geo, (2, 32, 32, 3))
    x["mask"] = jnp.broadcast_to(mask, (2, 32, 32))
    g0, _ = fwd(model, x)
    g1, _ = fwd(model, {**x, "gaze": x["gaze"] + 0.3})
    for k in ("means", "quats"):
        d = np.abs(np.asarray(g1[k] - g0[k])).max(-1)
        assert d[:, ~inside].max() == 0 and d[:, inside].mean() > 1e-3, k
    for k in ("colors", "scales", "opacities"):
        np.testing.assert_array_equal(g1[k], g0[k])


def test_view_direction_is_the_camera_centre():
    rot = jnp.asarray([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # camera at +x looking at -x
    vm = jnp.eye(4).at[:3, :3].set(rot).at[:3, 3].set(rot @ -jnp.asarray([0.7, 0, 0]))
    np.testing.assert_allclose(upm.view_direction(vm), [1.0, 0, 0], atol=1e-6)


@pytest.mark.heavy
def test_sharded_forward_equals_unsharded():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.rules_for("upm")
    graphdef, state = nnx.split(_new())
    model = nnx.merge(graphdef, jax.device_put(state, shd.param_shardings(state, mesh, rules)))
    k = model.geometry.convs[0].kernel[...]
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", "fsdp")
    x = _inputs()

    @nnx.jit
    def forward(m, x):
        with shd.axis_rules(rules):
            return _call(m, x)

    with jax.set_mesh(mesh):
        g, kl = forward(model, shd.put_batch(x, mesh))
    assert g["means"].sharding.spec[0] == ("data", "fsdp")
    ref_g, ref_kl = nnx.jit(_call)(_new(), {k: jnp.asarray(v) for k, v in x.items()})
    np.testing.assert_allclose(kl, ref_kl, rtol=1e-5, atol=1e-6)
    for name in g:
        np.testing.assert_allclose(g[name], ref_g[name], atol=1e-5, err_msg=name)


@pytest.mark.heavy
def test_stage_step_trains_on_the_mesh(synth_dir):
    """The shared jitted step (mesh, sharded init, AdamW) on one synthetic batch, 5 times: the
    loss falls and the render never overflows. (The full loop's checkpoint of a ~130-array
    state costs ~50 s of eager slicing on 2 CPU cores; that path runs in the slow test.)"""
    cfg = _cfg(synth_dir, "--config.optim.warmup_steps=1", "--config.optim.lr=3e-3")
    stage = get_stage("upm")
    batch = first_batch(stage.make_data(cfg, "train", 0, 1))
    spec = stage.batch_spec(cfg)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: (s.shape, np.dtype(s.dtype)) for k, s in spec.items()
    }
    setup = build(cfg, stage, shd.make_mesh(dict(cfg.mesh)))
    state, rows = setup.init(), []
    for _ in range(5):
        state, m = setup.train_step(state, shd.put_batch(batch, setup.mesh))
        rows.append(jax.device_get(m))
    losses = [float(r["loss"]) for r in rows]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(float(r["isect_overflow"]) == 0 and float(r["n_isects"]) > 0 for r in rows)
    assert {"rgb_l1", "rgb_ssim", "geom_l2", "kl", "negcolor", "scale_bound"} <= set(rows[0])


@pytest.mark.heavy
def test_eval_reports_upm_and_both_baselines(synth_dir):
    cfg = _cfg(synth_dir, "--config.data.batch_size=2")
    batch = first_batch(get_stage("upm").make_data(cfg, "eval", 0, 1))
    model = upm_stage.make_model(cfg, nnx.Rngs(0))
    out = jax.device_get(nnx.jit(upm_stage.make_eval(cfg))(model, batch, None))
    want = {"psnr", "ssim", "isect_overflow"}
    want |= {f"baseline_{b}_{m}" for b in ("zero_identity", "surfels") for m in ("psnr", "ssim")}
    assert set(out) == want and all(np.isfinite(v) for v in out.values())
    # every figure is a declared metric or a baseline of one, and every declared one is there
    assert {upm_stage.STAGE.metric_of(k) for k in out} == set(upm_stage.STAGE.metrics)
    assert out["isect_overflow"] == 0 and 5 < out["psnr"] < 40 and 5 < out["baseline_surfels_psnr"]


@pytest.mark.heavy
def test_no_overflow_on_a_full_resolution_tiny_frame(synth_dir):
    """Under jit (the training render) the default intersection capacity holds the tiny
    config's 64 px frames, also with every Gaussian grown to the scale-bound penalty's edge."""
    cfg = load_config("configs/upm.py:tiny", [f"--config.data.dir={synth_dir}"])
    size, rec = cfg.data.image_size, open_source(synth_dir, "train")[0]
    k = rec["view_K"][1].copy()
    k[:2] *= size / rec["view_image"].shape[2]  # the 32 px fixture frame at 64 px
    model = upm_stage.make_model(cfg, nnx.Rngs(0))
    tile = lambda a: jnp.asarray(np.broadcast_to(a, (8, *a.shape)), jnp.float32)
    g, _ = model(
        tile(rec["uv_texture"] / 255.0),
        tile(rec["uv_geometry"]),
        tile(rec["uv_mask"]),
        tile(rec["view_expression"][1]),
        tile(rec["view_viewmat"][1]),
        tile(rec["view_gaze"][1]),
    )
    big = {**g, "scales": jnp.full_like(g["scales"], cfg.model.scale_bound)}
    render = jax.jit(lambda g, v, k: upm.render_batch(g, v, k, size, size))
    for gs in (g, big):
        out = render(gs, tile(rec["view_viewmat"][1]), tile(k))
        assert int(out["isect_overflow"].max()) == 0 and int(out["n_isects"].min()) > 0
    assert float(out["alpha"].max()) > 0.9  # the head is in view


@pytest.mark.heavy
def test_paper_config_frame_fits_the_default_capacity(synth_dir):
    """The paper config's full-resolution frame (1024^2 Gaussians, 1024 px): with every Gaussian
    grown to the scale-bound penalty's edge, the Gaussian-tile intersections of each fixture view
    fit the capacity of the jitted training render (`model.isect_capacity`; the rasteriser's
    default 8N + 4096 would not), so no step of a converging run drops any."""
    cfg = load_config("configs/upm.py:paper", [f"--config.data.dir={synth_dir}"])
    r, size = cfg.data.uv_resolution, cfg.data.image_size
    rec = open_source(synth_dir, "train")[0]
    geo = jax.image.resize(jnp.asarray(rec["uv_geometry"]), (r, r, 3), "linear").reshape(-1, 3)
    mask = jax.image.resize(jnp.asarray(rec["uv_mask"], jnp.float32), (r, r), "nearest")
    n = r * r
    std = jnp.full((n, 3), cfg.model.scale_bound, jnp.float32)
    covars = covariance(jnp.broadcast_to(jnp.asarray([1.0, 0, 0, 0]), (n, 4)), std)
    cap = cfg.model.isect_capacity
    assert cap > tiles.default_isect_capacity(n, tiles.tile_grid(size, size, 16)[0] ** 2)

    @jax.jit
    def count(viewmat, K):
        p = project(geo, covars, viewmat, K, size, size, eps2d=upm.VARIANTS["paper"].eps2d)
        return tiles.count_isects(p.means2d, p.radii, mask.reshape(-1), size, size, 16)

    for v in range(len(rec["view_K"])):
        k = rec["view_K"][v].copy()
        k[:2] *= size / rec["view_image"].shape[2]
        got = int(count(jnp.asarray(rec["view_viewmat"][v]), jnp.asarray(k)))
        assert n // 4 < got <= cap, (v, got, cap)


@pytest.mark.heavy
def test_avatar_save_load_renders_identically_and_exports_ply(synth_dir, tmp_path):
    rec = open_source(synth_dir, "test")[0]
    cfg = load_config("configs/upm.py:tiny", [f"--config.data.dir={synth_dir}"])
    model = upm_stage.make_model(cfg, nnx.Rngs(0))
    av = Avatar.create(model, rec["uv_texture"] / 255.0, rec["uv_geometry"], rec["uv_mask"])
    assert model.identity_encoder is not None  # the caller's model is left whole
    args = (rec["view_viewmat"][1], rec["view_K"][1], 32, 32)
    kw = dict(expression=rec["view_expression"][1], gaze=rec["view_gaze"][1])
    img, alpha, meta = av.render(*args, **kw)
    assert img.shape == (32, 32, 3) and alpha.shape == (32, 32) and float(alpha.max()) > 0.9
    assert int(meta["isect_overflow"][0]) == 0
    av.save(tmp_path / "av")
    assert json.loads((tmp_path / "av" / "avatar.json").read_text())["arrays"].endswith(
        ".safetensors"
    )
    again = Avatar.load(tmp_path / "av")
    img2, alpha2, _ = again.render(*args, **kw)
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(alpha, alpha2)
    g = av.drive(jnp.zeros((3, cfg.data.expression_dim)))
    assert g["means"].shape == (3, 32 * 32, 3)
    n = av.save_ply(tmp_path / "frame.ply", **kw)
    back = ply.load_ply(tmp_path / "frame.ply")
    assert n == int(rec["uv_mask"].sum()) and back["means"].shape == (n, 3)


def test_unknown_variant_is_one_line_naming_the_valid_ones(tmp_path, capsys):
    argv = ["train", "upm", "--config", "upm:tiny", "--workdir", str(tmp_path)]
    assert main([*argv, "--config.model.variant=huge", "--config.data.dir=/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.variant='huge' is unknown" in err
    assert "'paper'" in err and "'tiny'" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_upm_stage_trains_and_evaluates_through_the_loop(synth_dir, tmp_path):
    """~1.5-4 min on 2 shared cores (the step's compile, eval's three renders, the checkpoint)."""
    cfg = _cfg(
        synth_dir,
        "--config.train.steps=6",
        "--config.train.log_every=1",
        "--config.train.ckpt_every=6",
        "--config.train.eval_every=6",
        "--config.optim.warmup_steps=1",
    )
    last = loop.train(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert {"eval/psnr", "eval/baseline_zero_identity_psnr", "eval/baseline_surfels_psnr"} <= set(
        last
    )
    assert last["eval/isect_overflow"] == 0
    assert (tmp_path / "checkpoints" / "6").is_dir()


@pytest.mark.heavy
def test_tiny_variant_follows_the_data_uv_resolution(synth_dir):
    """`upm:tiny` on 64^2 maps (`fica demo`'s default) keeps its three decoder levels and starts
    from an 8^2 seed; an explicit seed that does not fit is still refused."""
    over = [f"--config.data.dir={synth_dir}", "--config.data.uv_resolution=64"]
    c = upm_stage.upm_config(load_config("configs/upm.py:tiny", over))
    assert (c.uv_resolution, c.seed_resolution, c.levels) == (64, 8, 3)
    model = upm.UPM(c, rngs=nnx.Rngs(0))
    r, e = c.uv_resolution, c.expression_dim
    vm = jnp.asarray(open_source(synth_dir, "train")[0]["view_viewmat"][:1])
    g, _ = nnx.eval_shape(
        lambda m: m(jnp.zeros((1, r, r, 3)), jnp.zeros((1, r, r, 3)), jnp.ones((1, r, r)),
                    jnp.zeros((1, e)), vm, jnp.zeros((1, 2))), model,
    )  # fmt: skip
    assert g["means"].shape == (1, r, r, 3)  # one Gaussian per texel of the 64^2 map
    bad = load_config("configs/upm.py:tiny", [*over, "--config.model.seed_resolution=4"])
    with pytest.raises(ValueError, match="uv_resolution 64 != seed 4"):
        upm_stage.make_model(bad, nnx.Rngs(0))
