"""Head-pose / expression regressor (models/pose_head.py), its losses and the pose JSON reader."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.spatial.transform import Rotation

from fica_jax import sharding as shd
from fica_jax.errors import UserError
from fica_jax.infer import pose
from fica_jax.models import pose_head, vit
from fica_jax.stages import dense as dense_stage

TINY = dataclasses.replace(vit.VARIANTS["tiny"], image_size=(32, 32), patch=8, final_upsample=1)
POSED = dataclasses.replace(TINY, pose_head=True, expression_dim=5)


def test_6d_to_rotation_is_orthonormal_and_exact_on_its_own_rotation():
    rots = Rotation.random(64, random_state=0).as_matrix().astype(np.float32)
    back = pose_head.rotation_from_6d(pose_head.rotation_to_6d(jnp.asarray(rots)))
    np.testing.assert_allclose(back, rots, atol=1e-6)
    x = jax.random.normal(jax.random.key(0), (64, 6))
    r = np.asarray(pose_head.rotation_from_6d(x), np.float64)
    np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)
    # Gram-Schmidt keeps the first vector's direction and the plane of the first two
    a1 = np.asarray(x[:, :3])
    np.testing.assert_allclose(r[:, :, 0], a1 / np.linalg.norm(a1, axis=1, keepdims=True),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.einsum("bi,bi->b", r[:, :, 2], np.asarray(x[:, 3:])), 0,
                               atol=1e-4)  # fmt: skip


def test_geodesic_angle_matches_scipy():
    a, b = Rotation.random(32, random_state=1), Rotation.random(32, random_state=2)
    want = np.degrees((a.inv() * b).magnitude())
    got = pose_head.geodesic_deg(jnp.asarray(a.as_matrix()), jnp.asarray(b.as_matrix()))
    np.testing.assert_allclose(got, want, atol=1e-3)
    small = Rotation.from_rotvec([[1e-3, 0, 0]]).as_matrix().astype(np.float32)
    np.testing.assert_allclose(pose_head.geodesic_deg(jnp.eye(3)[None], small), 0.0573, atol=2e-4)


def test_camera_params_round_trip_and_follow_a_crop():
    from data_pipelines import transforms as T

    rng = np.random.default_rng(0)
    R = Rotation.random(4, random_state=3).as_matrix()
    vm = np.tile(np.eye(4), (4, 1, 1))
    vm[:, :3, :3], vm[:, :3, 3] = R, rng.uniform(-0.05, 0.05, (4, 3)) + [0, 0, 0.7]
    K = np.array([[60.0, 0, 17], [0, 62, 15], [0, 0, 1]])
    cam = pose.camera_params(jnp.asarray(K), jnp.asarray(vm), (32, 32))
    t = pose.translation_from_params(cam, jnp.asarray(K), (32, 32))
    np.testing.assert_allclose(t, vm[:, :3, 3], rtol=1e-5)
    # the head origin's pixel, warped by the crop, is the crop's cam (u, v) times its size
    aff = T.sample_affine(np.random.default_rng(1), (32, 32), (24, 24), T.AugmentConfig())
    K2 = T.warp_intrinsics(K.astype(np.float32), aff)
    cam2 = np.asarray(pose.camera_params(jnp.asarray(K2), jnp.asarray(vm), (24, 24)))
    px = np.asarray(cam[:, :2]) * 32
    np.testing.assert_allclose(cam2[:, :2] * 24, T.warp_points(px, aff), atol=1e-3)


def _good_pose(tmp_path, **over):
    vm = np.eye(4)
    vm[:3, :3] = Rotation.from_euler("y", 20, degrees=True).as_matrix() @ np.diag([1, -1, -1])
    vm[:3, 3] = [0.01, 0.02, 0.6]
    obj = {"image_size": [40, 30], "K": [[50, 0, 15], [0, 50, 20], [0, 0, 1]],
           "viewmat": vm.tolist(), "expression": [0.1, 0.0, 0.5], "gaze": [0.1, -0.05]}  # fmt: skip
    obj.update(over)
    obj = {k: v for k, v in obj.items() if v != "DROP"}
    p = tmp_path / "pose.json"
    p.write_text(json.dumps(obj))
    return p, obj


def test_pose_json_round_trip_and_rescale(tmp_path):
    p, obj = _good_pose(tmp_path)
    got = pose.load_pose_json(p)
    np.testing.assert_allclose(got["K"], obj["K"])
    np.testing.assert_allclose(got["viewmat"], obj["viewmat"], atol=1e-7)
    np.testing.assert_allclose(got["expression"], obj["expression"], atol=1e-7)
    np.testing.assert_allclose(got["gaze"], obj["gaze"], atol=1e-7)
    assert got["image_size"] == (40, 30) and got["K"].dtype == np.float32
    half = pose.load_pose_json(p, image_size=(20, 15))  # pixels halve: K's first two rows too
    np.testing.assert_allclose(half["K"], [[25, 0, 7.5], [0, 25, 10], [0, 0, 1]])
    p, _ = _good_pose(tmp_path, expression="DROP", gaze=None)
    opt = pose.load_pose_json(p)
    assert opt["expression"] is None and opt["gaze"] is None and opt["landmarks"] is None


def test_pose_json_landmarks_rescale_with_k_and_default_to_visible(tmp_path):
    vm = np.asarray(_good_pose(tmp_path)[1]["viewmat"])
    points = np.array([[0.0, 0.0, 0.0], [0.03, -0.02, 0.05], [-0.04, 0.05, 0.01]])
    K = np.array([[50.0, 0, 15], [0, 50, 20], [0, 0, 1]])

    def project(K):
        uvw = (points @ vm[:3, :3].T + vm[:3, 3]) @ K.T
        return uvw[:, :2] / uvw[:, 2:]

    p, _ = _good_pose(tmp_path, landmarks=project(K).tolist())
    got = pose.load_pose_json(p, image_size=(20, 45))  # rows halve, columns grow 1.5x
    np.testing.assert_allclose(got["landmarks"], project(got["K"]), atol=1e-4)
    assert got["landmarks_visible"].tolist() == [True] * 3
    p, _ = _good_pose(tmp_path, landmarks=project(K).tolist(), landmarks_visible=[1, 0, 1])
    assert pose.load_pose_json(p)["landmarks_visible"].tolist() == [True, False, True]


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("K", "DROP", "key 'K' is missing"),
        ("K", [[1, 0], [0, 1]], r"key 'K' has shape \[2, 2\], expected \[3, 3\]"),
        ("K", [[50, 0, 15], [0, 50, 20], [0, 1, 1]], "key 'K' must have"),
        ("viewmat", "DROP", "key 'viewmat' is missing"),
        ("viewmat", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], "key 'viewmat' has shape"),
        ("viewmat", np.diag([2.0, 2, 2, 1]).tolist(), "key 'viewmat' has a rotation block"),
        ("viewmat", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, "x"], [0, 0, 0, 1]], "'viewmat' is not"),
        ("image_size", "DROP", "key 'image_size' is missing"),
        ("image_size", [40.5, 30], "key 'image_size' must be two positive integers"),
        ("expression", [0.1, float("nan")], "key 'expression' has non-finite values"),
        ("expression", [[0.1]], r"key 'expression' has shape \[1, 1\], expected \[E\]"),
        ("gaze", [0.1, 0.2, 0.3], r"key 'gaze' has shape \[3\], expected \[2\]"),
        ("landmarks", [1.0, 2.0], r"key 'landmarks' has shape \[2\], expected \[L, 2\]"),
        ("landmarks_visible", [1, 0], "key 'landmarks_visible' needs one 0/1 per entry"),
    ],
)
def test_pose_json_bad_key_names_file_and_key(tmp_path, key, value, match):
    p, _ = _good_pose(tmp_path, **{key: value})
    with pytest.raises(UserError, match=match) as e:
        pose.load_pose_json(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_pose_json_bad_files(tmp_path):
    with pytest.raises(UserError, match="pose file not found"):
        pose.load_pose_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        pose.load_pose_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        pose.load_pose_json(tmp_path / "list.json")
    p, _ = _good_pose(tmp_path)
    with pytest.raises(UserError, match="key 'expression' has 3 values, expected 18"):
        pose.load_pose_json(p, expression_dim=18)


def _batch(n=8, size=32, e=5):
    rng = np.random.default_rng(0)
    vm = np.tile(np.eye(4, dtype=np.float32), (n, 1, 1))
    vm[:, :3, :3] = Rotation.random(n, random_state=4).as_matrix()
    vm[:, 2, 3] = 0.7
    K = np.tile(np.array([[50, 0, 16], [0, 50, 16], [0, 0, 1]], np.float32), (n, 1, 1))
    return {
        "image": jnp.asarray(rng.uniform(0, 1, (n, size, size, 3)), jnp.float32),
        "K": jnp.asarray(K),
        "viewmat": jnp.asarray(vm),
        "expression": jnp.asarray(rng.uniform(0, 1, (n, e)), jnp.float32),
    }


@pytest.mark.heavy
def test_each_pose_loss_term_gives_the_head_gradients():
    head = pose_head.PoseHead(32, 5, hidden=16, grid=2, channels=3, rngs=nnx.Rngs(0))
    batch, terms = _batch(), ("rot_l2", "cam_l1", "expr_l2")
    feats = jax.random.normal(jax.random.key(1), (8, 4, 4, 32))
    graphdef, params = nnx.split(head, nnx.Param)

    def losses(p):
        t = dense_stage.pose_losses(nnx.merge(graphdef, p)(feats), batch)
        return jnp.stack([t[k] for k in terms])

    jac = jax.jit(jax.jacrev(losses))(params)  # [3, ...] per parameter: one row per term
    for path, g in nnx.to_flat_state(jac):
        for i, term in enumerate(terms):
            assert float(jnp.abs(g[...][i]).max()) > 0, (term, path)
    # a perfect prediction costs nothing
    perfect = {
        "rot6d": pose_head.rotation_to_6d(batch["viewmat"][:, :3, :3]),
        "cam": pose.camera_params(batch["K"], batch["viewmat"], (32, 32)),
        "expression": batch["expression"],
    }
    for name, v in dense_stage.pose_losses(perfect, batch).items():
        assert float(v) < 1e-6, name
    # rot_l2 is the chordal distance 4 (1 - cos angle)
    turned = Rotation.from_euler("x", 30, degrees=True).as_matrix().astype(np.float32)
    off = {**perfect, "rot6d": pose_head.rotation_to_6d(batch["viewmat"][:, :3, :3] @ turned)}
    rot = float(dense_stage.pose_losses(off, batch)["rot_l2"])
    np.testing.assert_allclose(rot, 4 * (1 - np.cos(np.radians(30))), rtol=1e-4)


@pytest.mark.heavy
def test_predict_pose_dict_and_sharding_annotations():
    model = vit.DensePredictor(POSED, rngs=nnx.Rngs(0))  # the backbone gets the pose loss
    # through the stage's loss_fn, which calls the whole model (test_stage_dense)
    assert shd.unannotated_params(model) == []
    images = _batch()["image"]
    out = pose.predict_pose(model, images, method="regressor")
    assert out["K"].shape == (8, 3, 3) and out["viewmat"].shape == (8, 4, 4)
    assert out["expression"].shape == (8, 5) and out["gaze"] is None
    r = np.asarray(out["viewmat"][:, :3, :3], np.float64)
    np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_array_equal(out["viewmat"][:, 3], np.tile([0, 0, 0, 1], (8, 1)))
    # the head origin projects where the regressor's cam says, whichever K is used
    raw = pose._dense_outputs(model, images)
    for K in (None, np.array([[90, 0, 14], [0, 90, 18], [0, 0, 1]], np.float32)):
        o = pose.predict_pose(model, images, K, "regressor")
        p = np.einsum("bij,bj->bi", np.asarray(o["K"]), np.asarray(o["viewmat"][:, :3, 3]))
        np.testing.assert_allclose(p[:, :2] / p[:, 2:] / 32, raw["cam"][:, :2], atol=1e-5)
    with pytest.raises(UserError, match="no pose head"):
        pose.predict_pose(vit.DensePredictor(TINY, rngs=nnx.Rngs(0)), images, method="regressor")
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    specs = dict(nnx.to_flat_state(shd.param_specs(nnx.state(model), shd.rules_for("vit"), mesh)))
    assert specs[("pose", "reduce", "kernel")] == jax.sharding.PartitionSpec("fsdp", None)
    assert specs[("pose", "fc1", "kernel")] == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_mean_rotation_is_the_chordal_mean():
    base = Rotation.from_euler("y", 10, degrees=True)
    spread = Rotation.from_rotvec([[0.2, 0, 0], [-0.2, 0, 0], [0, 0.2, 0], [0, -0.2, 0]])
    rots = (base * spread).as_matrix()
    np.testing.assert_allclose(pose.mean_rotation(rots), base.as_matrix(), atol=1e-6)
    want = Rotation.from_matrix(rots).mean().as_matrix()  # scipy's chordal L2 mean
    np.testing.assert_allclose(pose.mean_rotation(rots), want, atol=1e-5)


def _pnp_scene(n=8, size=32, seed=0):
    """n cameras around a head-sized bumpy surface: the head-coordinate point seen at each pixel
    centre (vtx [n, H, W, 3]), K [n, 3, 3] and the true viewmat [n, 4, 4]."""
    rng = np.random.default_rng(seed)
    vm = np.tile(np.eye(4), (n, 1, 1))
    vm[:, :3, :3] = Rotation.random(n, random_state=seed + 5).as_matrix()
    vm[:, :3, 3] = np.c_[rng.uniform(-0.03, 0.03, (n, 2)), rng.uniform(0.5, 0.8, n)]
    f = rng.uniform(1.2, 2.0, n) * size
    K = np.zeros((n, 3, 3))
    K[:, 0, 0], K[:, 1, 1], K[:, 2, 2] = f, f * rng.uniform(0.95, 1.05, n), 1
    K[:, :2, 2] = size / 2 + rng.uniform(-2, 2, (n, 2))
    ys, xs = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    rays = np.einsum("bij,hwj->bhwi", np.linalg.inv(K), np.stack([xs, ys, np.ones_like(xs)], -1))
    bump = (
        0.05 * np.sin(xs / 5)[None] * np.cos(ys / 7)[None]
        + rng.uniform(-0.05, 0.05, n)[:, None, None]
    )
    cam = rays * (vm[:, 2, 3, None, None] + bump)[..., None]
    vtx = np.einsum("bji,bhwj->bhwi", vm[:, :3, :3], cam - vm[:, None, None, :3, 3])
    return vtx, K, vm


def _pnp_errors(vm, want):
    """(rotation deg [n], translation mm [n]) of viewmats vm against want."""
    vm = np.asarray(vm, np.float64)
    r = Rotation.from_matrix(vm[:, :3, :3]).inv() * Rotation.from_matrix(want[:, :3, :3])
    return np.degrees(r.magnitude()), 1000 * np.linalg.norm(vm[:, :3, 3] - want[:, :3, 3], axis=-1)


def _pnp(vtx, mask, K):
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return pose._pnp_jit(f32(vtx), f32(mask), f32(K))  # one compile for every test's shapes


@pytest.mark.heavy
def test_pnp_recovers_known_cameras_exactly_from_noiseless_points():
    vtx, K, want = _pnp_scene()
    vm = np.asarray(_pnp(vtx, np.ones(vtx.shape[:3]), K))
    rot, trans = _pnp_errors(vm, want)
    assert rot.max() < 0.01 and trans.max() < 0.1, (rot, trans)
    np.testing.assert_allclose(vm[:, 3], np.tile([0, 0, 0, 1], (8, 1)))
    # every image is solved on its own: the batch's order does not matter
    perm = np.array([3, 1, 7, 0, 2, 6, 5, 4])
    np.testing.assert_allclose(_pnp(vtx[perm], np.ones(vtx.shape[:3]), K[perm]), vm[perm],
                               atol=1e-4)  # fmt: skip


def test_pnp_is_robust_to_noise_and_outliers_and_ignores_the_background():
    vtx, K, want = _pnp_scene(seed=1)
    rng = np.random.default_rng(2)
    noisy = vtx + rng.normal(0, 0.002, vtx.shape)  # 2 mm on a 0.5-0.8 m camera distance
    bad = rng.uniform(size=vtx.shape[:3]) < 0.2
    noisy[bad] += rng.normal(0, 0.1, (bad.sum(), 3))  # 20 % gross outliers (10 cm)
    rot, trans = _pnp_errors(_pnp(noisy, np.ones(vtx.shape[:3]), K), want)
    assert rot.max() < 1.0 and trans.max() < 10.0, (rot, trans)
    # background pixels (mask < 0.5) hold garbage; the foreground's probabilities vary
    mask = rng.uniform(0.6, 1.0, vtx.shape[:3])
    mask[:, :, :12] = rng.uniform(0.0, 0.49, (8, 32, 12))
    junk = vtx.copy()
    junk[:, :, :12] = rng.normal(0, 1.0, (8, 32, 12, 3))
    rot, trans = _pnp_errors(_pnp(junk, mask, K), want)
    assert rot.max() < 0.01 and trans.max() < 0.1, (rot, trans)
    # and the mask is what made the difference: the same points unmasked are off
    rot, _ = _pnp_errors(_pnp(junk, np.ones(vtx.shape[:3]), K), want)
    assert rot.max() > 1.0, rot


def test_predict_pose_pnp_solves_the_predicted_vertex_map(monkeypatch):
    vtx, K, want = _pnp_scene(seed=3)
    model = vit.DensePredictor(POSED, rngs=nnx.Rngs(0))
    images = _batch()["image"]
    head = pose._dense_outputs(model, images)
    fake = head | {"vtx": jnp.asarray(vtx, jnp.float32), "mask": jnp.ones((8, 32, 32))}
    monkeypatch.setattr(pose, "_dense_outputs", lambda m, im: fake)
    out = pose.predict_pose(model, images, jnp.asarray(K, jnp.float32))
    rot, trans = _pnp_errors(out["viewmat"], want)
    assert rot.max() < 0.01 and trans.max() < 0.1, (rot, trans)
    np.testing.assert_allclose(out["expression"], head["expression"])  # from the pose head
    np.testing.assert_allclose(out["K"], K, rtol=1e-6)
    no_head = vit.DensePredictor(TINY, rngs=nnx.Rngs(0))
    assert pose.predict_pose(no_head, images, jnp.asarray(K, jnp.float32))["expression"] is None
    with pytest.raises(UserError, match="pose method 'pn' is unknown"):
        pose.predict_pose(model, images, method="pn")


def _train_synthetic_dense(tmp, n_ids: int, n_frames: int, steps: int, *extra: str, seed=0):
    """Synthesises n_ids identities (64 px, n_frames dome frames each) into tmp / "data", trains
    the tiny dense config on them for `steps` steps and returns the last logged metrics
    (held-out eval included)."""
    from data_pipelines.synth import synthesize
    from data_pipelines.synthetic.generator import SynthConfig
    from fica_jax.config import load_config
    from fica_jax.train import loop

    data = tmp / "data"
    cfg = SynthConfig(uv_resolution=32, image_size=64, n_frames=n_frames)
    synthesize(data, n_ids, cfg, seed=seed, progress=False)
    cfg = load_config(
        "configs/dense.py:tiny",
        [
            f"--config.data.dir={data}",
            "--config.data.image_size=64",
            f"--config.train.steps={steps}",
            f"--config.train.eval_every={steps}",
            "--config.mesh.fsdp=-1",
            *extra,
        ],
    )
    last = loop.train(cfg, tmp / "run")
    print({k: round(float(v), 4) for k, v in last.items() if k.startswith("eval/")})
    return last


@pytest.fixture(scope="module")
def trained_dense(tmp_path_factory):
    """The tiny dense config (with its pose head) trained 600 steps on 48 synthetic identities x
    8 views at 64 px (42 train, 6 held out): the last logged metrics, held-out eval included."""
    return _train_synthetic_dense(tmp_path_factory.mktemp("pose_run"), 48, 7, 600)


@pytest.mark.slow
def test_pose_regressor_rotation_beats_the_mean_on_held_out_identities(trained_dense):
    """Observed: this test on 2 idle cores (6.9 min with the expression one) 31.0 deg vs
    64.7 deg for the train split's mean rotation, translation 34 mm; `fica train dense` with the
    same settings 31.9 deg (47.0 at step 300). With the attention-pooling head it replaced: 68.5 deg (worse than the
    mean). PnP from the predicted vertex map is not asserted: the vertex map is still ~38 mm."""
    last = trained_dense
    assert last["eval/rot_deg"] < 0.7 * last["eval/baseline_rot_deg"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="expression is not yet predicted better than the mean")
def test_pose_regressor_expression_beats_the_mean_on_held_out_identities(trained_dense):
    """Known to fail (issue 12 stays open on it): expression MSE 0.093 vs 0.088 for the mean at
    600 steps; a ridge regression on the masked 16^2 or 32^2 pixels does no better (0.090 /
    0.092). Not a readout or loss-weight problem: expr weight 10 gives 0.088 vs 0.088 over all
    48 held-out views; 4x the data (192 identities x 8 views, 1000 steps at batch 16: rotation
    17.6 vs 35.0 deg) still 0.080 vs 0.079, with the *training* expression loss flat at the
    mean's level, and a ridge on the trained ViT tokens no better (jaw_open 0.111 vs 0.105). A
    pixel CNN on the same 1,344 views fits the training set (MSE 0.0007) and loses to the mean
    on every held-out dimension, jaw_open included, though an open jaw is plainly visible at
    64 px: at this data scale identity, texture and view dominate the images and the expression
    is memorised per identity. strict: when it starts passing, this mark has to go. The pose
    head's expression is this test's subject; the landmark branch (next test) beats the mean."""
    last = trained_dense
    assert last["eval/expr_mse"] < 0.95 * last["eval/baseline_expr_mse"]


@pytest.mark.slow
def test_landmark_branch_expression_beats_the_mean_on_held_out_identities(tmp_path):
    """The dense stage's landmark branch (models/landmarks.py) trained alone (every other weight
    0 but expr) on 2,000 synthetic identities x 4 views at 64 px (1,750 train, 250 held out),
    2,500 steps at batch 32. About 12 min to synthesise and 15 min to train on 2 cores.
    Observed with the same settings through `fica train dense`: held-out landmarks 0.93 px,
    expression MSE 0.0658 against 0.0685 for the train mean (-4%; jaw_open carries it). With 168
    training identities the same net reached 2.8 px and lost to the mean."""
    off = [f"--config.model.loss_weights.{k}=0" for k in ("uv", "vtx", "nrm", "mask", "rot", "cam")]
    last = _train_synthetic_dense(
        tmp_path, 2000, 3, 2500, "--config.data.batch_size=32", "--config.optim.lr=2e-3",
        "--config.model.loss_weights.kpt=1.0", *off, seed=1,
    )  # fmt: skip
    assert last["eval/kpt_px"] < 1.5
    assert last["eval/expr_mse"] < 0.98 * last["eval/baseline_expr_mse"]


def test_expression_offset_is_computed_once_per_code_and_read_only():
    """`generate.expression_offset` poses the maps for the shape fit, the refiner and the
    transfer: one computation per (template, code, size), shared read-only; no code, zeros."""
    from fica_jax.infer import generate

    key, code = "fica-procedural-head-r24", np.linspace(-0.5, 0.5, 4).astype(np.float32)
    generate._expression_offset.cache_clear()
    a = generate.expression_offset(key, code, 16)
    b = generate.expression_offset(key, code.copy(), 16)
    assert a is b and not a.flags.writeable and np.abs(a).max() > 0
    assert generate._expression_offset.cache_info().misses == 1
    assert generate.expression_offset(key, code * 0.5, 16) is not a
    assert not generate.expression_offset(key, None, 16).any()
