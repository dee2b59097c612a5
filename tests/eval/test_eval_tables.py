"""`fica eval`'s portrait and UV texture tables (fica_jax/eval/harness.py, texture.py, report.py)
on a hand-made record, without models: the generator, the VAE and the renderers are replaced by
stand-ins with known answers, so each figure is known exactly. The renderer stand-in reproduces
a view of the capture only when given that view's camera, expression and gaze; the portrait row
therefore reads the capture's own figure only if it is rendered with view 0's and compared with
the portrait image."""

import json
import pathlib

import numpy as np
import pytest

from fica_jax.eval import harness, report
from fica_jax.eval.protocol import BUDGET, MAIN, UV_TEXTURE

V, H, R = 3, 24, 8


def _record(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    K = np.stack([np.diag([20.0 + v, 20.0 + v, 1.0]) for v in range(V)]).astype(np.float32)
    viewmat = np.stack([np.eye(4)] * V).astype(np.float32)
    viewmat[:, 2, 3] = 2.0 + np.arange(V)
    atlas = np.zeros((R, R), np.uint8)
    atlas[:, :6] = 1
    partial = np.zeros((R, R, 10), np.float16)
    partial[:4, :, 3] = 1  # the portrait shows rows 0..3
    return {"identity": f"id{seed}", "view_K": K, "view_viewmat": viewmat,
            "view_image": rng.integers(0, 256, (V, H, H, 3), dtype=np.uint8),
            "view_expression": rng.normal(size=(V, 4)).astype(np.float32),
            "view_gaze": rng.normal(size=(V, 2)).astype(np.float32),
            "view_kpts": np.zeros((V, 5, 2), np.float32),
            "uv_texture": np.full((R, R, 3), 128, np.uint8), "uv_mask": atlas,
            "partial_uv": partial}  # fmt: skip


def _capture_renderer(rec, calls):
    """Renders view v's image exactly from view v's camera, expression and gaze; black else."""

    def render(frame):
        calls.append(frame)
        for v in range(V):
            if all(np.array_equal(frame[k], rec[f"view_{k}"][v])
                   for k in ("K", "viewmat", "expression", "gaze")):  # fmt: skip
                return rec["view_image"][v] / 255.0
        return np.zeros((H, H, 3))

    return render


def _maps(rec) -> dict:
    """UV maps per method: texture = GT + an offset on the visible / unseen texels (dB known)."""
    gt = rec["uv_texture"] / 255.0
    seen = rec["partial_uv"][..., 3:4] > 0.5
    tex = lambda vis, uns: {"texture": gt + np.where(seen, vis, uns), "geometry": None,
                            "mask": rec["uv_mask"]}  # fmt: skip
    # the error budget's rows render dimmed by a known factor (the renderer stand-in reads it)
    dim = lambda m, k: {**m, "dim": k}
    return {"mean": tex(0.1, 0.1), "mesh": tex(0.0, 0.01), "3dgs": tex(0.0, 0.01),
            "gt_upm": tex(0.0, 0.0), "abl_emb": tex(0.01, 0.1), "abl_rgb": tex(0.1, 0.1),
            "vae_upm": dim(tex(0.0, 0.01), 0.9), "gt_tex": dim(tex(0.0, 0.0), 0.8),
            "gt_geo": dim(tex(0.0, 0.01), 0.7)}  # fmt: skip


@pytest.fixture
def evaluated(monkeypatch, tmp_path):
    import fica_jax.quality.face as face

    rec, calls = _record(), []
    render = _capture_renderer(rec, calls)
    monkeypatch.setattr(harness, "_identity_maps", lambda rec, models, **kw: _maps(rec))
    monkeypatch.setattr(harness, "_avatar", lambda upm, maps, backend, tmp: maps)
    monkeypatch.setattr(harness, "_upm_render", lambda av, f, bk: render(f) * av.get("dim", 1.0))
    monkeypatch.setattr(harness, "_mesh_render", lambda t, g, m, f, name: render(f))
    monkeypatch.setattr(face, "record_face_masks", lambda rec, t: np.ones((V, H, H), bool))
    scorer = harness.Scorer(str(tmp_path), str(tmp_path / "none.pth"))  # LPIPS/ID unavailable
    kw = dict(backend="jax", steps=1, seed=0, pose="gt", cfg_scale=None, frames=None)
    template = type("T", (), {"name": "t"})
    rows, renders = harness.evaluate_identity(rec, {"upm": None}, scorer, template, tmp=tmp_path,
                                              **kw)  # fmt: skip
    return rec, rows, renders, calls, scorer


def test_portrait_rows_render_view_0_against_the_portrait(evaluated):
    rec, rows, renders, calls, _ = evaluated
    by = report.split_rows(rows)
    portrait = {r["method"]: r for r in by["portrait"]}
    assert sorted(portrait) == sorted(k for k, _ in MAIN)
    for r in portrait.values():  # the capture's own view 0: exact (PSNR capped at 120 dB)
        assert r["frame"] == 0 and r["psnr"] == pytest.approx(120.0) and r["ssim"] == 1.0
    first = [f for f in calls if f["view"] == 0]
    assert len(first) == len(MAIN)
    for k in ("K", "viewmat", "expression", "gaze"):
        assert all(np.array_equal(f[k], rec[f"view_{k}"][0]) for f in first), k
    assert np.allclose(first[0]["image"], rec["view_image"][0] / 255.0)
    # the dome frames are views 1.., every method, and the contact sheet holds no portrait
    assert sorted({r["frame"] for r in by["frames"]}) == [1, 2]
    assert len(by["frames"]) == 2 * 9
    assert all(r["psnr"] == pytest.approx(120) for r in by["frames"] if r["method"] in dict(MAIN))
    assert all(f["view"] for fs in renders.values() for f, *_ in fs)


def test_uv_texture_rows_split_visible_and_unseen(evaluated):
    _, rows, *_ = evaluated
    uv = {r["method"]: r for r in report.split_rows(rows)["uv_texture"]}
    assert sorted(uv) == sorted(["mean", "abl_rgb", "abl_emb", "3dgs", "vae"])  # no mesh, no GT
    want = {"mean": (20, 20), "abl_rgb": (20, 20), "abl_emb": (40, 20), "3dgs": (120, 40),
            "vae": (120, 40)}  # fmt: skip
    for m, (vis, uns) in want.items():
        assert uv[m]["visible_psnr"] == pytest.approx(vis, abs=1e-3), m
        assert uv[m]["unseen_psnr"] == pytest.approx(uns, abs=1e-3), m


def test_report_tables_portrait_and_uv_texture(evaluated, tmp_path):
    """Rows of two identities (the second's UV figures 1 dB up) through metrics.csv and the
    report: the two new tables, their standard errors and deltas from the mean texture."""
    _, rows, _, _, scorer = evaluated
    two = [{**r, "sample": 0} for r in rows]
    two += [{**r, "identity": "id1", "sample": 0,
             **{k: r[k] + 1.0 for k in ("visible_psnr", "unseen_psnr") if k in r}}
            for r in rows]  # fmt: skip
    harness.write_csv(tmp_path / "metrics.part-0.csv", two)
    back = report.gather_parts(tmp_path, 1, timeout=1)  # through the CSV, as a multi-host run
    info = {"identities": 2, "data": "d", "split": "test", "models": "m", "backend": "jax",
            "steps": 1, "pose": "gt", "weights": scorer.notes}  # fmt: skip
    rep = report.write_report(tmp_path, back, {}, info)
    uv = {r["method"]: r for r in rep["tables"]["uv_texture"]}
    assert [r["method"] for r in rep["tables"]["uv_texture"]] == [k for k, _ in UV_TEXTURE]
    assert uv["abl_emb"]["visible_psnr"] == pytest.approx(40.5, abs=1e-3)
    assert uv["abl_emb"]["visible_psnr_se"] == pytest.approx(0.5, abs=1e-3)
    assert uv["abl_emb"]["visible_psnr_delta"] == pytest.approx(20.0, abs=1e-3)  # vs the mean
    assert uv["3dgs"]["unseen_psnr_delta"] == pytest.approx(20.0, abs=1e-3)
    assert uv["abl_maps"]["visible_psnr"] == "not trained" and uv["vae"]["identities"] == 2
    portrait = {r["method"]: r for r in rep["tables"]["portrait"]}
    assert portrait["3dgs"]["psnr"] == pytest.approx(120.0) and portrait["mean"]["identities"] == 2
    main = {r["method"]: r for r in rep["tables"]["main"]}
    assert "visible_psnr" not in main["3dgs"] and main["3dgs"]["psnr"] == pytest.approx(120.0)
    saved = json.loads(pathlib.Path(tmp_path / "report.json").read_text())["tables"]
    assert set(saved) == {"main", "ablation", "portrait", "uv_texture", "budget"}
    # the error budget: every row paired with the bound (its Δ is its PSNR minus the bound's),
    # in the order of how much the stand-in dims them
    budget = {r["method"]: r for r in rep["tables"]["budget"]}
    assert [r["method"] for r in rep["tables"]["budget"]] == [k for k, _ in BUDGET]
    assert budget["gt_upm"]["psnr"] == pytest.approx(120.0)
    for m in ("vae_upm", "gt_tex", "gt_geo"):
        assert budget[m]["psnr_delta"] == pytest.approx(budget[m]["psnr"] - 120.0, abs=1e-3), m
    assert 0 > budget["vae_upm"]["psnr_delta"] > budget["gt_tex"]["psnr_delta"] > \
        budget["gt_geo"]["psnr_delta"]  # fmt: skip
    text = (tmp_path / "report.md").read_text()
    for s in ("### Portrait (view 0", "### UV texture", "PSNR unseen texels (dB) ↑",
              "GT maps through the VAE (ceiling)", "### Error budget"):  # fmt: skip
        assert s in text, s


def test_error_budget_maps_swap_one_of_ficas_maps_for_the_ground_truth(monkeypatch):
    """`_identity_maps`' budget rows: the VAE's round trip of the ground truth, the ground-truth
    texture on FiCA's geometry and FiCA's texture on the ground-truth geometry."""
    from types import SimpleNamespace

    import fica_jax.infer.generate as generate
    from fica_jax.eval import texture

    rec = _record()
    kpts = np.random.default_rng(0).uniform(0, 16, (V, 68, 2)).astype(np.float32)
    rec |= {"view_image": np.zeros((V, 16, 16, 3), np.uint8),
            "uv_geometry": np.full((R, R, 3), 0.5, np.float32), "view_kpts": kpts,
            "view_kpts_visible": np.ones((V, 68), np.uint8)}  # fmt: skip
    fica = {"texture": np.full((R, R, 3), 0.2, np.float32), "geometry": np.full((R, R, 3), 0.1),
            "mask": rec["uv_mask"], "dit_texture": 0, "dit_geometry": 0}  # fmt: skip
    poses = []
    monkeypatch.setattr(generate, "generate_maps",
                        lambda portrait, models, **kw: poses.append(kw["pose"]) or (fica, {}))  # fmt: skip
    vae = (np.full((R, R, 3), 0.3, np.float32), np.full((R, R, 3), 0.4, np.float32))
    monkeypatch.setattr(texture, "vae_maps", lambda rec, models: vae)
    models = {"dense": SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(image_size=16))),
              "dit": SimpleNamespace(stats={"mean_texture": 0, "mean_geometry": 0})}  # fmt: skip
    maps = harness._identity_maps(rec, models, steps=1, seed=0, pose="gt", cfg_scale=None)
    gt = rec["uv_texture"] / 255.0
    assert maps["vae_upm"]["texture"] is vae[0] and maps["vae_upm"]["geometry"] is vae[1]
    np.testing.assert_allclose(maps["gt_tex"]["texture"], gt)
    assert maps["gt_tex"]["geometry"] is fica["geometry"]
    assert maps["gt_geo"]["texture"] is fica["texture"]
    np.testing.assert_array_equal(maps["gt_geo"]["geometry"], rec["uv_geometry"])
    # --pose gt hands generation the portrait's landmarks, as a tracker's --pose JSON would
    np.testing.assert_array_equal(poses[0]["landmarks"], kpts[0])
    assert poses[0]["landmarks_visible"].all()


def test_eval_refuses_models_laid_out_on_another_template(synth_dir):
    """`fica eval`'s data and models must share a head template (one line naming both)."""
    from types import SimpleNamespace

    from fica_jax.errors import UserError
    from fica_jax.eval.harness import _face_template

    same = SimpleNamespace(meta={"stats": {"template": {"key": "fica-procedural-head-r48"}}})
    assert _face_template(synth_dir, {"upm": same}).name == "fica-procedural-head-r48"
    other = SimpleNamespace(meta={"stats": {"template": {"key": "ava256-topology@0123456789ab"}}})
    with pytest.raises(UserError, match=r"--data .* 'fica-procedural-head-r48', --models upm .*"):
        _face_template(synth_dir, {"dense": same, "upm": other})
