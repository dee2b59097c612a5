"""Reader for one Ava-256 capture (also Goliath's head captures, which share the layout).

Layout of `<capture>/decoder/`, as read by facebookresearch/ava-256 `data/ava_dataset.py`
(`SingleCaptureDataset.fetch_data_from_disk`), `data/utils.py`, `utils.py`
(`load_camera_calibration`) and `demos/mesh.py`, and by facebookresearch/goliath
`ca_code/utils/dataloader.py`:

  camera_calibration.json   {"KRT": [{"cameraId", "K", "T", "distortion"}, ...]}. K is stored
                            TRANSPOSED (K = json_K.T); T is the world->camera [R|t; 0 0 0 1]
                            stored transposed, translation in its last ROW (upstream: T[:4, :3].T),
                            in millimetres, calibrated for the 2668 x 4096 (W x H, portrait) sensor
                            (`load_camera_calibration` records height 4096, width 2668).
  frame_list.csv            CSV with a header naming columns `seg_id` and `frame_id` (unpadded
                            integers; members use `f"{int(frame_id):06d}"`).
  image/cam<ID>.zip         `cam<ID>/<frame:06d>.avif`, stored downscaled from the sensor.
  head_pose/head_pose.zip   `<frame:06d>.txt`, a 3x4 [R|t] mapping head-local vertices to world
                            (`demos/mesh.py`: `head_pose @ [v; 1]` then `K @ RT`), millimetres.
                            Older releases stored `<frame:06d>.npy`; both are read.
  kinematic_tracking/registration_vertices.zip
                            `<frame:06d>.ply` (ava-256) or `registration_vertices/<frame:06d>.ply`
                            (goliath): head-local vertices, no faces, millimetres (goliath-based
                            loaders divide by 1000; demos/mesh.py plots them within +-200).
  uv_image/color.zip        `color/<frame:06d>.avif` (ava-256) or `.png` (goliath): the unwrapped
                            texture, bottom row v = 0 (see `common.py`).

Intrinsics at the stored size: ava-256 resizes frames to (2668 / ds, 4096 / ds) and divides focal
and principal point by ds with no half-pixel shift (`SingleCaptureDataset.__init__`;
`demos/mesh.py` divides projected pixels by 4). That is the pixel-edge convention of
`common.py`, so K is scaled per axis by (W / 2668, H / 4096), identical for exact factors. Goliath's
`get_camera_parameters` instead uses (c + 0.5) / ds - 0.5 (integer pixel centres); the two differ
by 0.5 * (1 - 1/ds) stored pixels, and this reader follows ava-256.

The capture's topology OBJ is not in the capture folder (ava-256 ships `assets/face_topology.obj`),
so `topology_obj()` returns None here. Cameras listed in the JSON without an image zip are dropped,
as goliath's `get_camera_calibration` does.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from data_pipelines.formats.common import (
    MM,
    CaptureFile,
    FrameZip,
    RawCamera,
    bad,
    decode_rgb,
    image_size,
    intrinsics,
    neutral_of,
    parse_matrix,
    rigid_4x4,
)
from data_pipelines.formats.ply import read_ply_vertices

SENSOR_WIDTH, SENSOR_HEIGHT = 2668, 4096
NEUTRAL_SEGMENT = "EXP_neutral_peak"  # ava-256 data/utils.py get_framelist_neuttex_and_neutvert


def _read_frame_list(path: Path) -> tuple[list[str], dict[str, str]]:
    if not path.is_file():
        raise bad(path, "file not found (expected the capture's frame list CSV)")
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
            fields = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise bad(path, f"cannot read CSV ({e})") from None
    if not rows or "frame_id" not in fields or "seg_id" not in fields:
        raise bad(path, "expected a header with columns 'seg_id' and 'frame_id' and >= 1 row")
    frames, segment = [], {}
    for i, row in enumerate(rows, 2):
        fid, seg = (row["frame_id"] or "").strip(), (row["seg_id"] or "").strip()
        if not fid.isdigit() or not seg:
            raise bad(path, f"line {i}: frame_id {fid!r} / seg_id {seg!r}, expected an integer id")
        if fid in segment:
            raise bad(path, f"line {i}: frame {fid} listed twice")
        frames.append(fid)
        segment[fid] = seg
    return frames, segment


def _read_calibration(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """cameraId -> (K at the sensor, 3x4 [R|t] in mm, distortion), untransposed."""
    if not path.is_file():
        raise bad(path, "file not found (expected the cameras' KRT JSON)")
    try:
        krt = json.loads(path.read_text())["KRT"]
        items = [(str(c["cameraId"]), c) for c in krt]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise bad(path, f"expected {{'KRT': [{{'cameraId', 'K', 'T'}}, ...]}} ({e!r})") from None
    out = {}
    for cam, c in items:
        try:
            k_json = np.asarray(c["K"], dtype=np.float64)
            t_json = np.asarray(c["T"], dtype=np.float64)
            dist = np.asarray(c.get("distortion", []), dtype=np.float64).reshape(-1)
        except (KeyError, ValueError, TypeError) as e:
            raise bad(path, f"camera {cam}: cannot read K/T/distortion ({e!r})") from None
        k = intrinsics(k_json.T, path, None, f"camera {cam} K (stored transposed)")
        if t_json.shape not in ((4, 4), (4, 3)):
            raise bad(
                path,
                f"camera {cam} T has shape {list(t_json.shape)}, expected [4, 4] (transposed [R|t])",
            )
        out[cam] = (k, t_json[:4, :3].T, dist)
    if not out:
        raise bad(path, "no cameras in 'KRT'")
    return out


class Ava256Capture(CaptureFile):
    """Open Ava-256 capture; zips stay open until `close()`. See the module docstring."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.root = path / "decoder" if (path / "decoder").is_dir() else path
        if not self.root.is_dir():
            raise bad(path, "capture folder not found (expected <capture>/decoder/)")
        base = self.root.parent if self.root.name == "decoder" else self.root
        self.identity = base.name
        self.frames, self.segment = _read_frame_list(self.root / "frame_list.csv")
        calib_path = self.root / "camera_calibration.json"
        calib = _read_calibration(calib_path)
        self._zips: list[FrameZip] = []
        try:
            self._open(calib, calib_path)
        except BaseException:
            self.close()
            raise

    def _open(self, calib, calib_path: Path) -> None:
        self._poses = self._zip(self.root / "head_pose" / "head_pose.zip", ("txt", "npy"))
        self._verts = self._zip(
            self.root / "kinematic_tracking" / "registration_vertices.zip", ("ply",)
        )
        self._color = self._zip(self.root / "uv_image" / "color.zip", ("avif", "png"))
        for z in (self._poses, self._verts):  # geometry must cover every listed frame
            missing = [f for f in self.frames if not z.has(f)]
            if missing:
                raise bad(
                    z.path,
                    f"{len(missing)} frame(s) of frame_list.csv have no member, first "
                    f"{missing[0]} (expected '{int(missing[0]):06d}.{z.suffixes[0]}')",
                )
        self._images: dict[str, FrameZip] = {}
        self.cameras: dict[str, RawCamera] = {}
        for cam, (k, rt, dist) in calib.items():
            zpath = self.root / "image" / f"cam{cam}.zip"
            if not zpath.exists():
                continue
            z = self._images[cam] = self._zip(zpath, ("avif", "png", "jpg"))
            if not z.members:
                raise bad(zpath, "no '<frame:06d>.avif' members")
            first = next((f for f in self.frames if z.has(f)), None)
            data, member = z.read(first) if first else z.read(str(min(z.members)))
            w, h = image_size(data, zpath, member)
            if abs(w * SENSOR_HEIGHT - h * SENSOR_WIDTH) > max(SENSOR_WIDTH, SENSOR_HEIGHT):
                raise bad(
                    zpath,
                    f"image is {w}x{h}, expected the {SENSOR_WIDTH}x{SENSOR_HEIGHT} sensor's "
                    "aspect (downscaled)",
                    member,
                )
            scale = np.diag([w / SENSOR_WIDTH, h / SENSOR_HEIGHT, 1.0])
            w2c = rigid_4x4(rt, calib_path, None, f"camera {cam} extrinsic")
            self.cameras[cam] = RawCamera(cam, scale @ k, w2c, int(w), int(h), dist)
        if not self.cameras:
            raise bad(
                self.root / "image",
                f"no cam<ID>.zip for any of the {len(calib)} cameras in camera_calibration.json",
            )

    def _zip(self, path: Path, suffixes: tuple[str, ...]) -> FrameZip:
        z = FrameZip(path, suffixes)
        self._zips.append(z)
        return z

    def _check_frame(self, frame: str) -> None:
        if frame not in self.segment:
            raise bad(self.root / "frame_list.csv", f"frame {frame!r} is not listed")

    def neutral_frame(self) -> str:
        """Lowest-numbered frame of segment EXP_neutral_peak (ava-256 `data/utils.py`)."""
        return neutral_of(self.frames, self.segment, NEUTRAL_SEGMENT, self.root / "frame_list.csv")

    def vertices(self, frame: str) -> np.ndarray:
        """[N, 3] float64 head-local vertices in metres."""
        self._check_frame(frame)
        data, member = self._verts.read(frame)
        return read_ply_vertices(data, self._verts.path, member) * MM

    def head_to_world(self, frame: str) -> np.ndarray:
        """[4, 4] float64 head-local -> world, metres."""
        self._check_frame(frame)
        data, member = self._poses.read(frame)
        if member.endswith(".npy"):
            try:
                m = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise bad(self._poses.path, f"cannot read .npy ({e})", member) from None
        else:
            m = parse_matrix(data.decode("utf-8", "replace"), self._poses.path, member)
        return rigid_4x4(m, self._poses.path, member, "head pose")

    def has_image(self, camera: str, frame: str) -> bool:
        """Whether camera has a frame (real captures miss some frames for some cameras)."""
        return camera in self._images and self._images[camera].has(frame)

    def image(self, camera: str, frame: str) -> np.ndarray:
        """uint8 [H, W, 3] as stored (the size `cameras[camera]` gives)."""
        self._check_frame(frame)
        if camera not in self.cameras:
            raise bad(self.root / "image", f"no camera {camera!r} (have {sorted(self.cameras)})")
        z, cam = self._images[camera], self.cameras[camera]
        data, member = z.read(frame)
        img = decode_rgb(data, z.path, member)
        if img.shape[:2] != (cam.height, cam.width):
            raise bad(
                z.path,
                f"image is {img.shape[1]}x{img.shape[0]}, expected {cam.width}x{cam.height} "
                "like the camera's other frames",
                member,
            )
        return img

    def uv_texture(self, frame: str) -> np.ndarray:
        """uint8 [T, T, 3]; row r covers v_ours in [r/T, (r+1)/T) (stored rows, unflipped)."""
        self._check_frame(frame)
        data, member = self._color.read(frame)
        tex = decode_rgb(data, self._color.path, member)
        if tex.shape[0] != tex.shape[1]:
            raise bad(
                self._color.path,
                f"texture is {tex.shape[1]}x{tex.shape[0]}, expected square",
                member,
            )
        return tex

    def close(self) -> None:
        for z in self._zips:
            z.close()
        self._zips = []


def open_ava256(path: str | Path) -> Ava256Capture:
    """Opens an Ava-256 (or Goliath head) capture folder: `<capture>` or `<capture>/decoder`."""
    return Ava256Capture(path)
