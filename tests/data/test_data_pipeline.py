"""Grain stage pipelines: determinism, resumable state, host sharding, workers, augmentation,
over the example functions the stages declare (`Stage.example`)."""

import dataclasses

import jax
import numpy as np
import pytest
from fake_records import fake_record, write_fake_dataset
from jax.sharding import PartitionSpec as P

from data_pipelines import transforms as T
from data_pipelines.pipeline import check_uv_resolution, host_slice, make_pipeline, mean_maps
from data_pipelines.source import CaptureSource
from fica_jax.commands.demo import portrait_example
from fica_jax.errors import UserError
from fica_jax.sharding import make_mesh, put_batch
from fica_jax.train.stage import get_stage

# what each stage declares, and the demo's conditioning-sheet rows (the portrait, resized only)
EXAMPLES = {n: get_stage(n).example for n in ("dense", "vae", "upm")} | {
    "portrait": portrait_example
}
dense_example, vae_example = EXAMPLES["dense"], EXAMPLES["vae"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe") / "ds"
    write_fake_dataset(d, n=20, records_per_shard=4)  # 16 train, 4 test
    return d


def _batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("stage", ["dense", "vae", "portrait", "upm"])
def test_stage_shapes_and_determinism(data_dir, stage):
    kw = dict(global_batch_size=4, seed=3, image_size=12)
    a = _batches(make_pipeline(data_dir, EXAMPLES[stage], "train", **kw), 2)
    b = _batches(make_pipeline(data_dir, EXAMPLES[stage], "train", **kw), 2)
    for x, y in zip(a, b, strict=True):
        _same(x, y)
    c = _batches(make_pipeline(data_dir, EXAMPLES[stage], "train", **{**kw, "seed": 4}), 2)
    assert any(not np.array_equal(a[i][k], c[i][k]) for i in range(2) for k in a[i])
    first = a[0]
    assert all(isinstance(v, np.ndarray) and v.shape[0] == 4 for v in first.values())
    if stage in ("dense", "portrait"):
        assert first["image"].shape == (4, 12, 12, 3) and first["image"].dtype == np.float32
        assert 0 <= first["image"].min() and first["image"].max() <= 1
    # One value range for every stage (SCHEMA.md "Value ranges"): textures in [0, 1].
    tex = first.get("uv_texture", first.get("image"))
    assert tex.dtype == np.float32 and 0 <= tex.min() and tex.max() <= 1 and tex.max() > 0.5
    if stage == "upm":
        assert first["frame_image"].shape == (4, 12, 12, 3)
        assert (first["frame_view"] >= 1).all()  # never the portrait


def test_resume_from_state(data_dir):
    ds = make_pipeline(data_dir, dense_example, "train", global_batch_size=4, seed=0)
    it = iter(ds)
    for _ in range(5):  # crosses an epoch boundary (16 records / 4 per batch)
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    it2 = iter(make_pipeline(data_dir, dense_example, "train", global_batch_size=4, seed=0))
    it2.set_state(state)
    for w in want:
        _same(next(it2), w)


def _marker(batch):
    # fake_record writes the record index into uv_texture[0, 0]; the pipeline gives /255
    return np.rint(batch["uv_texture"][:, 0, 0, 0] * 255).astype(int).tolist()


def test_host_sharding_disjoint_and_complete(data_dir):
    seen = []
    for host in range(3):
        ds = make_pipeline(
            data_dir,
            vae_example,
            "train",
            global_batch_size=3,
            seed=0,
            process_index=host,
            process_count=3,
            num_epochs=1,
            shuffle=False,
        )
        seen.append([m for b in ds for m in _marker(b)])
    train_ids = [i for i in range(20) if i % 5 != 4]
    # batch 1 per host: nothing dropped; slices are disjoint and cover every record
    assert sorted(sum(seen, [])) == train_ids
    assert all(set(a).isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    sl = [host_slice(10, i, 4) for i in range(4)]
    assert [(s.start, s.stop) for s in sl] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    with pytest.raises(UserError, match="not divisible"):
        make_pipeline(data_dir, vae_example, "train", global_batch_size=4, seed=0, process_count=3)


def test_epoch_reshuffle(data_dir):
    ds = make_pipeline(data_dir, vae_example, "train", global_batch_size=16, seed=0, num_epochs=2)
    e1, e2 = (_marker(b) for b in ds)
    assert sorted(e1) == sorted(e2) and e1 != e2


def test_workers_match_in_process(data_dir):
    kw = dict(global_batch_size=2, seed=1, num_epochs=1, image_size=8)
    ref = list(make_pipeline(data_dir, dense_example, "test", **kw))
    got = list(make_pipeline(data_dir, dense_example, "test", workers=2, **kw))
    assert len(ref) == len(got) == 2
    for a, b in zip(ref, got, strict=True):
        _same(a, b)


def test_put_batch_on_data_fsdp_mesh(data_dir):
    mesh = make_mesh({"data": 2, "fsdp": 4})
    batch = next(iter(make_pipeline(data_dir, dense_example, "train", global_batch_size=8, seed=0)))
    arrays = put_batch(batch, mesh)
    assert arrays["image"].sharding.spec == P(("data", "fsdp"), None, None, None)
    assert arrays["kpts"].sharding.spec == P(("data", "fsdp"), None, None)
    assert arrays["view"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(jax.device_get(arrays["image"]), batch["image"])


# ----------------------------------------------------------------------------- augmentation
def _coded_record(size=32):
    """A record whose image, uv and vtx all encode the pixel position."""
    rec = fake_record(0, size=size, views=2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    pos = np.stack([x / size, y / size], -1)
    rec["view_image"][:] = (np.concatenate([pos, np.zeros_like(pos[..., :1])], -1) * 255).round()
    rec["view_uv"][:] = pos
    rec["view_vtx"][:] = np.concatenate([pos, np.ones_like(pos[..., :1])], -1)
    rec["view_mask"][:] = 1
    rec["view_kpts"][:] = [[5.5, 7.5], [20.5, 3.5], [12.5, 28.5], [30.5, 30.5], [1.5, 16.5]]
    rec["view_kpts_visible"][:] = 1
    return rec


def test_geometric_aug_is_consistent_across_targets():
    rec = _coded_record()
    opts = T.TransformOptions(augment=True, image_size=24, aug=T.AugmentConfig(p=0.0))
    moved = 0
    plain = dense_example(rec, np.random.default_rng(0), dataclasses.replace(opts, augment=False))
    for s in range(8):
        ex = dense_example(rec, np.random.default_rng(s), opts)
        inside = ex["mask"] > 0
        # image (bilinear) and uv/vtx (nearest) agree on where each output pixel came from
        img_pos = ex["image"][..., :2]
        assert np.abs(img_pos - ex["uv"])[inside].max() < 1.5 / 32 + 1e-3
        np.testing.assert_array_equal(ex["vtx"][..., :2], ex["uv"])
        assert (ex["uv"][~inside] == 0).all()  # outside the source frame: no targets
        # each keypoint lands on the output pixel whose uv points back at it
        kpts = zip(ex["kpts"], ex["kpts_visible"], rec["view_kpts"][0], strict=True)
        for (kx, ky), vis, src in kpts:
            if vis:
                u = ex["uv"][int(ky), int(kx)] * 32
                assert np.abs(u - src).max() <= 1.6
        moved += not np.array_equal(ex["uv"], plain["uv"])
    assert moved >= 6  # crops really move and scale


def test_no_augment_is_plain_resize():
    rec = _coded_record()
    ex = dense_example(rec, np.random.default_rng(0), T.TransformOptions(augment=False))
    v = int(ex["view"])
    np.testing.assert_allclose(ex["image"], rec["view_image"][v] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(ex["kpts"], rec["view_kpts"][v])


def test_intrinsics_follow_the_crop():
    K = np.array([[30.0, 0, 16], [0, 28, 15], [0, 0, 1]], np.float32)
    aff = T.sample_affine(np.random.default_rng(1), (32, 32), (24, 24), T.AugmentConfig())
    pts = np.random.default_rng(2).uniform(-0.3, 0.3, (10, 3)) + [0, 0, 2]
    proj = lambda k: (pts @ k.T)[:, :2] / pts[:, 2:]
    np.testing.assert_allclose(
        T.warp_points(proj(K), aff), proj(T.warp_intrinsics(K, aff)), atol=1e-4
    )


def test_photometric():
    img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    out = T.photometric(img, np.random.default_rng(0), T.AugmentConfig(p=1.0))
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert np.abs(out - img).mean() > 0.01
    same = T.photometric(img, np.random.default_rng(0), dataclasses.replace(T.AugmentConfig(), p=0))
    np.testing.assert_allclose(same, img)


def test_upm_needs_frames_and_unknown_stage(data_dir):
    rec = fake_record(0, views=1)
    with pytest.raises(UserError, match="no dome frames"):
        EXAMPLES["upm"](rec, np.random.default_rng(0), T.TransformOptions())
    with pytest.raises(UserError, match="not a function"):
        make_pipeline(data_dir, "nope", "train", global_batch_size=1, seed=0)


def test_capture_data_from_config(data_dir):
    from configs.common import base_config
    from data_pipelines.pipeline import CaptureData

    cfg = base_config("vae")
    cfg.data.batch_size = 2
    with pytest.raises(UserError, match="data.dir"):
        CaptureData(vae_example)(cfg, "train", 0, 1)
    cfg.data.dir = str(data_dir)
    assert _marker(next(iter(CaptureData(vae_example)(cfg, "train", 0, 1))))  # repeats, shuffled
    evals = list(CaptureData(vae_example)(cfg, "test", 0, 1))  # one ordered pass
    assert [m for b in evals for m in _marker(b)] == [4, 9, 14, 19]


def test_corrupt_record_error_crosses_worker_processes(tmp_path):
    d = tmp_path / "ds"
    write_fake_dataset(d, n=4, records_per_shard=4)
    shard = d / "train-00000-of-00001.array_record"
    b = bytearray(shard.read_bytes())
    for j in range(2000, 2100):
        b[j] ^= 0xFF
    shard.write_bytes(bytes(b))
    ds = make_pipeline(
        d, vae_example, "train", global_batch_size=1, seed=0, num_epochs=1, workers=1
    )
    with pytest.raises(UserError, match=f"{shard} record 0: corrupt"):
        list(ds)


def test_uv_maps_and_their_mean_resized_by_one_nearest_texel_rule(data_dir):
    """A config's smaller data.uv_resolution: the VAE's maps are the stored ones' nearest texels
    (texel 2i+1 of 8 for 4; masks stay binary), and the mean maps (the position reference) are
    resized by the same rule, i.e. they are the mean of the maps the VAE sees."""
    kw = dict(global_batch_size=4, seed=0, augment=False, shuffle=False, num_epochs=1)
    batch = next(iter(make_pipeline(data_dir, vae_example, "train", uv_resolution=4, **kw)))
    src = CaptureSource(data_dir, "train")
    for k in ("uv_texture", "uv_geometry", "uv_normal", "uv_mask"):
        stored = np.stack([np.asarray(src[i][k], np.float32) for i in range(4)])
        want = stored[:, 1::2, 1::2] / (255.0 if k == "uv_texture" else 1.0)
        np.testing.assert_array_equal(batch[k], want)
    assert set(np.unique(batch["uv_mask"])) <= {0.0, 1.0}
    stored = next(iter(make_pipeline(data_dir, vae_example, "train", **kw)))
    assert stored["uv_geometry"].shape == (4, 8, 8, 3)  # None keeps the stored side
    mean = mean_maps(data_dir, "train", resolution=4)
    geo = np.mean([T.uv_maps(src[i], 4)["uv_geometry"] for i in range(len(src))], axis=0)
    np.testing.assert_allclose(mean["mean_geometry"], geo, atol=1e-5)
    assert mean["mean_texture"].shape == (4, 4, 3)


def test_a_uv_resolution_the_data_or_model_cannot_give_is_refused(data_dir):
    check_uv_resolution(data_dir, 8, 4)
    check_uv_resolution("", 64, 8)  # no data to compare with: the factor only
    with pytest.raises(UserError, match=r"data.uv_resolution=16 is larger than the 8x8 .*most 8"):
        check_uv_resolution(data_dir, 16)
    with pytest.raises(UserError, match=r"data.uv_resolution=6: expected a positive multiple of 4"):
        check_uv_resolution(data_dir, 6, 4)


def test_pooled_control_is_each_cells_mean_over_its_seen_texels():
    """`latents.pixel_control(pooled=True)` on a hand-made 4x4 map onto a 2x2 grid: rgb, normal
    and position averaged over the seen texels of each cell only; the mask channel the seen
    share on [-1, 1]; an unseen cell zero with mask -1. Space-to-depth keeps every texel."""
    from data_pipelines.latents import pixel_control

    maps = np.full((4, 4, 10), 0.7, np.float32)  # unseen texels carry a background value
    maps[..., 3] = -1.0
    maps[0, 0, :3], maps[0, 0, 3] = (0.2, 0.4, 0.6), 1.0  # cell (0, 0): two seen texels
    maps[1, 1, :3], maps[1, 1, 3] = (0.4, 0.0, 0.2), 1.0
    maps[2:, 2:, 3] = 1.0  # cell (1, 1): all four seen, their values 0.7
    out = pixel_control(maps, ("rgb", "mask", "nrm", "vtx"), grid=2, pooled=True)
    assert out.shape == (2, 2, 10)
    np.testing.assert_allclose(out[0, 0, :3], [0.3, 0.2, 0.4], atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 3], 2 * 2 / 4 - 1)
    np.testing.assert_allclose(out[0, 0, 4:], 0.7, atol=1e-6)
    np.testing.assert_allclose(out[0, 1], [0, 0, 0, -1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(
        out[1, 1], [0.7, 0.7, 0.7, 1, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7], atol=1e-6
    )
    rgb = pixel_control(maps, ("rgb",), grid=2, pooled=True)
    np.testing.assert_array_equal(rgb, out[..., :3])
    full = pixel_control(maps, ("rgb", "mask"), grid=2)
    assert full.shape == (2, 2, 16)
    np.testing.assert_array_equal(full[0, 0].reshape(2, 2, 4), maps[:2, :2, :4])


def test_select_control_is_the_one_dispatch_of_cache_and_generate():
    """`latents.select_control`, used by the cache's examples and `fica generate`: the pixel
    modes are `pixel_control` and never encode; "latents" takes each chosen group's channels."""
    from data_pipelines.latents import pixel_control, select_control

    maps = np.random.default_rng(0).normal(size=(2, 4, 4, 10)).astype(np.float32)
    z = np.arange(2 * 2 * 2 * 12, dtype=np.float32).reshape(2, 2, 2, 12)  # 4 groups x 3 ch

    def never():
        raise AssertionError("the pixel modes must not encode")

    for mode in ("pixels", "pooled"):
        np.testing.assert_array_equal(
            select_control(mode, ("rgb", "vtx"), maps, never, 2),
            pixel_control(maps, ("rgb", "vtx"), 2, pooled=mode == "pooled"),
        )
    out = select_control("latents", ("mask", "vtx"), maps, lambda: z, 2)
    np.testing.assert_array_equal(out, np.concatenate([z[..., 3:6], z[..., 9:12]], -1))


def test_random_background_replaces_only_the_background():
    from data_pipelines.transforms import random_background

    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (16, 16, 3)).astype(np.float32)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 5:10] = 1
    out = random_background(img, mask, rng)
    np.testing.assert_array_equal(out[mask > 0], img[mask > 0])
    assert np.abs(out[mask == 0] - img[mask == 0]).mean() > 0.05
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
