"""Reader for one Multiface subject folder (e.g. `m--20180227--0000--6795937--GHS`).

Layout, as read by facebookresearch/multiface `dataset.py` (`load_krt`, `Dataset.__getitem__`)
and described in `documentation/DATA_STRUCTURE.md` and `documentation/DATASET_ASSET.md`:

  KRT              per camera: a name line, 3 rows of K, 1 row of distortion, 3 rows of the
                   world->camera [R|t] (3x4, millimetres), then a blank line (`load_krt`). K is
                   in pixels of the released images (2048 x 1334, H x W: `utils.Renderer` projects
                   with K[R|t] straight onto them, no rescale), so it is used as stored.
  frame_list.txt   `<expression> <frame>` per line (e.g. `E057_Cheeks_Puffed 021897`).
  tracked_mesh/<expr>/<frame>.bin
                   float32 head-local vertices, millimetres (`aligned_verts`); `<frame>.obj`
                   carries the same topology with UVs (read here only if the .bin is missing,
                   assuming the same coordinates, which is unverified).
  tracked_mesh/<expr>/<frame>_transform.txt
                   3x4 [R_f|t_f] head-local -> world: `dataset.py` builds the projection as
                   K [R_C R_f | R_C t_f + t_C] for the head-local vertices and the head-space
                   camera position as R_f^T (campos - t_f). (The maintainers' reply in multiface
                   issue #10 calls it a projection matrix; the code treats it as a rigid pose, and
                   this reader checks that its 3x3 block is a rotation.)
  images/<expr>/<camera>/<frame>.png
  unwrapped_uv_1024/<expr>/average/<frame>.png
                   the view-averaged texture; `dataset.py` flips its rows before sampling with
                   OBJ UVs, i.e. the bottom row is v = 0 (see `common.py`).

Units are millimetres (multiface issues #10 and #22; translations in KRT are ~700). The neutral
frame is the lowest-numbered frame of `E001_Neutral_Eyes_Open`, the neutral expression that
ava-256's earlier `data/ava_dataset.py` used for Multiface-layout captures. Cameras without any
image folder are dropped, as `Dataset.__init__` keeps only frames whose files exist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.formats.common import (
    MM,
    CaptureFile,
    RawCamera,
    bad,
    decode_rgb,
    image_size,
    intrinsics,
    neutral_of,
    parse_matrix,
    rigid_4x4,
)
from data_pipelines.formats.meshes import read_vertices

NEUTRAL_EXPRESSION = "E001_Neutral_Eyes_Open"


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise bad(path, f"file not found (expected {what})")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise bad(path, f"cannot read {what} ({e})") from None


def _read_krt(path: Path) -> dict[str, RawCamera]:
    """Cameras with size 0x0 (filled in from the images later)."""
    lines = _read_text(path, "the cameras' KRT text file").splitlines()
    cams, i = {}, 0
    while i < len(lines):
        name = lines[i].strip()
        if not name:
            i += 1
            continue
        block = lines[i + 1 : i + 8]
        try:
            rows = [[float(t) for t in line.split()] for line in block]
        except ValueError:
            rows = []
        sizes = [len(r) for r in rows]
        if len(rows) != 7 or sizes[:3] != [3, 3, 3] or sizes[4:] != [4, 4, 4]:
            raise bad(
                path,
                f"line {i + 1}: camera {name!r} expects 3 rows of K (3 numbers), 1 distortion "
                "row, 3 rows of [R|t] (4 numbers)",
            )
        k = intrinsics(np.asarray(rows[:3]), path, f"line {i + 2}", f"camera {name} K")
        w2c = rigid_4x4(np.asarray(rows[4:]), path, f"line {i + 6}", f"camera {name} [R|t]")
        cams[name] = RawCamera(name, k, w2c, 0, 0, np.asarray(rows[3], dtype=np.float64))
        i += 8
    if not cams:
        raise bad(path, "no cameras (expected name, K, distortion, [R|t] blocks)")
    return cams


class MultifaceCapture(CaptureFile):  # nothing held open: loose files
    """Open Multiface subject. See the module docstring for layout and conventions."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        if not self.root.is_dir():
            raise bad(self.root, "subject folder not found")
        self.identity = self.root.name
        self._list = self.root / "frame_list.txt"
        self.frames: list[str] = []
        self.segment: dict[str, str] = {}
        for n, line in enumerate(
            _read_text(self._list, "'<expression> <frame>' lines").splitlines(), 1
        ):
            tok = line.split()
            if not tok:
                continue
            if len(tok) != 2 or not tok[1].isdigit():
                raise bad(
                    self._list, f"line {n}: {line.strip()!r}, expected '<expression> <frame>'"
                )
            if tok[1] in self.segment:
                raise bad(self._list, f"line {n}: frame {tok[1]} listed twice")
            self.frames.append(tok[1])
            self.segment[tok[1]] = tok[0]
        if not self.frames:
            raise bad(self._list, "no frames listed")
        for f in self.frames:  # geometry must exist for every listed frame
            mesh = self._mesh(f)
            if not mesh.with_suffix(".bin").is_file() and not mesh.with_suffix(".obj").is_file():
                raise bad(mesh.parent, f"frame {f} of frame_list.txt has no {f}.bin (or {f}.obj)")
            if not mesh.with_name(f"{f}_transform.txt").is_file():
                raise bad(mesh.parent, f"frame {f} of frame_list.txt has no {f}_transform.txt")
        self.cameras: dict[str, RawCamera] = {}
        for name, cam in _read_krt(self.root / "KRT").items():
            first = next((f for f in self.frames if self._image_path(name, f).is_file()), None)
            if first is None:
                continue
            w, h = image_size(self._image_path(name, first), self._image_path(name, first))
            self.cameras[name] = RawCamera(name, cam.K, cam.world_to_cam, w, h, cam.distortion)
        if not self.cameras:
            raise bad(self.root / "images", "no images for any camera in KRT")

    def _mesh(self, frame: str) -> Path:
        return self.root / "tracked_mesh" / self.segment[frame] / frame

    def _image_path(self, camera: str, frame: str) -> Path:
        return self.root / "images" / self.segment[frame] / camera / f"{frame}.png"

    def _check_frame(self, frame: str) -> None:
        if frame not in self.segment:
            raise bad(self._list, f"frame {frame!r} is not listed")

    def neutral_frame(self) -> str:
        """Lowest-numbered frame of E001_Neutral_Eyes_Open."""
        return neutral_of(self.frames, self.segment, NEUTRAL_EXPRESSION, self._list)

    def vertices(self, frame: str) -> np.ndarray:
        """[N, 3] float64 head-local vertices in metres, from <frame>.bin (or <frame>.obj)."""
        self._check_frame(frame)
        path = self._mesh(frame).with_suffix(".bin")
        return read_vertices(path if path.is_file() else path.with_suffix(".obj")) * MM

    def head_to_world(self, frame: str) -> np.ndarray:
        """[4, 4] float64 head-local -> world, metres."""
        self._check_frame(frame)
        path = self._mesh(frame).with_name(f"{frame}_transform.txt")
        m = parse_matrix(_read_text(path, "a 3x4 head transform"), path)
        return rigid_4x4(m, path, None, "head transform")

    def has_image(self, camera: str, frame: str) -> bool:
        return frame in self.segment and self._image_path(camera, frame).is_file()

    def image(self, camera: str, frame: str) -> np.ndarray:
        """uint8 [H, W, 3] as stored."""
        self._check_frame(frame)
        if camera not in self.cameras:
            raise bad(
                self.root / "KRT", f"no camera {camera!r} with images (have {sorted(self.cameras)})"
            )
        path, cam = self._image_path(camera, frame), self.cameras[camera]
        if not path.is_file():
            raise bad(path, "file not found (expected the camera's frame as PNG)")
        img = decode_rgb(path.read_bytes(), path)
        if img.shape[:2] != (cam.height, cam.width):
            raise bad(
                path, f"image is {img.shape[1]}x{img.shape[0]}, expected {cam.width}x{cam.height}"
            )
        return img

    def uv_texture(self, frame: str) -> np.ndarray:
        """uint8 [T, T, 3] view-averaged texture; row r covers v_ours in [r/T, (r+1)/T)."""
        self._check_frame(frame)
        path = self.root / "unwrapped_uv_1024" / self.segment[frame] / "average" / f"{frame}.png"
        if not path.is_file():
            raise bad(path, "file not found (expected the frame's average unwrapped texture)")
        tex = decode_rgb(path.read_bytes(), path)
        if tex.shape[0] != tex.shape[1]:
            raise bad(path, f"texture is {tex.shape[1]}x{tex.shape[0]}, expected square")
        return tex

    def topology_obj(self) -> Path | None:
        """The neutral (else first) frame's tracked-mesh OBJ, which carries vt UVs and faces."""
        cands = [self.frames[0]]
        if NEUTRAL_EXPRESSION in self.segment.values():
            cands.insert(0, self.neutral_frame())
        for f in cands:
            if self._mesh(f).with_suffix(".obj").is_file():
                return self._mesh(f).with_suffix(".obj")
        return None


def open_multiface(path: str | Path) -> MultifaceCapture:
    """Opens a Multiface subject folder (holding KRT, frame_list.txt, tracked_mesh/, images/)."""
    return MultifaceCapture(path)
