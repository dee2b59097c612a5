"""Tiny schema-valid records for data-pipeline tests (no generator needed).

Values are random but deterministic per (index, seed) and carry structure the tests can check:
the image's red channel encodes the pixel column and the record index is written into the
texture, so crops, flips of order and mix-ups between records are visible.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import schema


def fake_record(
    index: int,
    *,
    seed: int = 0,
    res: int = 8,
    size: int = 16,
    views: int = 3,
    landmarks: int = 5,
    expr: int = 4,
    shape: int = 3,
    split: str | None = None,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, index])
    R, H, V, L = res, size, views, landmarks
    col = np.broadcast_to(np.arange(H, dtype=np.float32)[None, :], (H, H))
    img = rng.integers(0, 256, (V, H, H, 3), dtype=np.uint8)
    img[..., 0] = (col * (255 / max(H - 1, 1))).astype(np.uint8)
    mask = np.zeros((V, H, H), np.uint8)
    mask[:, H // 4 : 3 * H // 4, H // 4 : 3 * H // 4] = 1
    tex = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
    tex[0, 0] = index % 256
    f16 = lambda *s: rng.standard_normal(s).astype(np.float16)
    K = np.tile(np.array([[H, 0, H / 2], [0, H, H / 2], [0, 0, 1]], np.float32), (V, 1, 1))
    vm = np.tile(np.eye(4, dtype=np.float32), (V, 1, 1))
    vm[:, 2, 3] = 1.0
    rec = {
        "schema_version": np.int32(schema.SCHEMA_VERSION),
        "identity": np.str_(f"id{index:04d}"),
        "split": np.str_(split or ("test" if index % 5 == 4 else "train")),
        "id_coeffs": rng.standard_normal(shape).astype(np.float32),
        "uv_texture": tex,
        "uv_geometry": rng.standard_normal((R, R, 3)).astype(np.float32),
        "uv_normal": f16(R, R, 3),
        "uv_mask": (rng.random((R, R)) > 0.3).astype(np.uint8),
        "partial_uv": f16(R, R, schema.PARTIAL_UV_DIM),
        "view_image": img,
        "view_mask": mask,
        "view_uv": rng.random((V, H, H, 2)).astype(np.float16),
        "view_vtx": f16(V, H, H, 3),
        "view_nrm": f16(V, H, H, 3),
        "view_depth": rng.random((V, H, H)).astype(np.float16),
        "view_kpts": (rng.random((V, L, 2)) * H).astype(np.float32),
        "view_kpts_visible": (rng.random((V, L)) > 0.2).astype(np.uint8),
        "view_K": K,
        "view_viewmat": vm,
        "view_expression": rng.standard_normal((V, expr)).astype(np.float32),
        "view_gaze": rng.standard_normal((V, 2)).astype(np.float32),
        "view_uv_geometry": f16(V, R, R, 3),
    }
    schema.validate(rec)
    return rec


def write_fake_dataset(out_dir, n: int = 10, records_per_shard: int = 3, **kw) -> None:
    from data_pipelines.shards import DatasetWriter

    with DatasetWriter(
        out_dir,
        records_per_shard=records_per_shard,
        generator={"name": "fake_records", "n": n},
        template={"note": "fake"},
    ) as w:
        for i in range(n):
            w.add(fake_record(i, **kw))


def fake_make_identity(index: int, cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Stand-in for `generator.make_identity` (top-level, so process pools can pickle it)."""
    return fake_record(index, seed=seed, **cfg)
