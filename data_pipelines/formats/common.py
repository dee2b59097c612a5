"""Shared pieces of the raw capture readers: the camera record, the capture protocol, zip and
image access, and the checks that turn bad files into one-line `UserError`s.

Conventions every reader returns (the converter builds training records on them):
- `RawCamera.K` is in pixels at the STORED image size with pixel (0, 0) covering [0, 1) x [0, 1)
  (pixel centres at +0.5), so resizing an image by s multiplies fx, fy, cx, cy by s and needs no
  half-pixel shift.
- `RawCamera.world_to_cam` is a 4x4 OpenCV camera (x right, y down, z forward) in METRES.
- Vertices are head-local METRES; `head_to_world` maps them into the world of the cameras.
- UV textures come back with row r covering v_ours in [r/T, (r+1)/T), where v_ours = 1 - v_obj and
  v_obj is the OBJ/OpenGL texture coordinate (v up). Both datasets store the texture with its
  bottom row at v_obj = 0 (multiface `dataset.py` flips the PNG rows before sampling with OBJ
  UVs; ava-256 `utils.py::create_uv_baridx` flips its texel grid with `np.flipud`), which is
  already row 0 = top = v_ours 0, so readers return the stored pixels unflipped.
- Images and textures are the stored uint8 RGB values; no colour transform is applied (some
  third-party Ava-256 / Goliath loaders apply linear2srgb to the frames; not verified upstream,
  so that choice is left to the converter).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from fica_jax.errors import UserError

MM = 1e-3  # both datasets store geometry and camera translations in millimetres


def bad(file: Path | str, what: str, member: str | None = None) -> UserError:
    """One-line UserError naming the file (and zip member or line) and what was expected."""
    where = f"{file}" if member is None else f"{file} [{member}]"
    return UserError(" ".join(f"{where}: {what}".split()))


@dataclass(frozen=True)
class RawCamera:
    """One calibrated camera, converted to our conventions (see the module docstring).

    `distortion` holds the stored lens coefficients for reference only: readers never undistort,
    and both upstream loaders project with K[R|t] alone.
    """

    name: str
    K: np.ndarray  # [3, 3] float64, pixels at the stored image size, centres at +0.5
    world_to_cam: np.ndarray  # [4, 4] float64, OpenCV axes, metres
    width: int  # stored image width
    height: int  # stored image height
    distortion: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [D] as stored


class RawCapture(Protocol):
    """One identity of a multi-view head capture (Ava-256: one capture folder; Multiface: one
    subject folder). Frame ids are the dataset's own strings, in file order."""

    identity: str
    cameras: dict[str, RawCamera]
    frames: list[str]
    segment: dict[str, str]

    def neutral_frame(self) -> str: ...
    def vertices(self, frame: str) -> np.ndarray: ...  # [N, 3] float64 head-local metres
    def head_to_world(self, frame: str) -> np.ndarray: ...  # [4, 4] float64 metres
    def image(self, camera: str, frame: str) -> np.ndarray: ...  # [H, W, 3] uint8
    def has_image(self, camera: str, frame: str) -> bool: ...
    def uv_texture(self, frame: str) -> np.ndarray: ...  # [T, T, 3] uint8, row 0 = v_ours 0
    def topology_obj(self) -> Path | None: ...
    def close(self) -> None: ...


class CaptureFile:
    """What both readers share: a context manager that closes what the capture holds open."""

    def topology_obj(self) -> Path | None:
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FrameZip:
    """A zip of one member per frame, kept open while the capture is open.

    Members are found by the integer in their file stem, whatever folder prefix they carry:
    ava-256 writes `000123.ply` / `cam<ID>/000123.avif` / `color/000123.avif`, Goliath writes
    `registration_vertices/000123.ply` / `color/000123.png` (goliath `ca_code/utils/dataloader.py`).
    """

    def __init__(self, path: Path, suffixes: tuple[str, ...]):
        self.path = path
        if not path.is_file():
            raise bad(path, "file not found (expected a zip with one member per frame)")
        try:
            self._zip = zipfile.ZipFile(path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise bad(path, f"not a readable zip file ({e})") from None
        self.members: dict[int, str] = {}
        for name in names:
            stem, _, ext = PurePosixPath(name).name.rpartition(".")
            if ext.lower() in suffixes and stem.isdigit():
                self.members.setdefault(int(stem), name)
        self.suffixes = suffixes

    def has(self, frame: str) -> bool:
        return frame.isdigit() and int(frame) in self.members

    def read(self, frame: str) -> tuple[bytes, str]:
        """The member's bytes (streamed with `ZipFile.open`) and its name."""
        name = self.members.get(int(frame)) if frame.isdigit() else None
        if name is None:
            hint = f"{int(frame):06d}" if frame.isdigit() else frame
            raise bad(
                self.path,
                f"no member for frame {frame} (expected '{hint}.{self.suffixes[0]}', any folder)",
            )
        try:
            with self._zip.open(name) as f:
                return f.read(), name
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise bad(self.path, f"cannot read member ({e})", name) from None

    def close(self) -> None:
        self._zip.close()


def _why(e: Exception) -> str:
    return "not a recognised image format" if isinstance(e, UnidentifiedImageError) else str(e)


def decode_rgb(data: bytes, file: Path | str, member: str | None = None) -> np.ndarray:
    """Decodes PNG/AVIF/JPEG bytes to uint8 [H, W, 3] (alpha dropped, grey expanded)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise bad(file, f"cannot decode image ({_why(e)})", member) from None


def image_size(src: bytes | Path, file: Path | str, member: str | None = None) -> tuple[int, int]:
    """(width, height) from the image header (bytes or a file path), without decoding pixels."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise bad(file, f"cannot read image header ({_why(e)})", member) from None


def parse_matrix(text: str, file: Path | str, member: str | None = None) -> np.ndarray:
    """Whitespace-separated rows of numbers (a 3x4 or 4x4 head pose) as float64."""
    try:
        rows = [[float(t) for t in line.split()] for line in text.splitlines() if line.strip()]
        m = np.asarray(rows, dtype=np.float64)
    except ValueError:
        raise bad(file, "expected rows of numbers (a 3x4 rigid transform)", member) from None
    return m


def rigid_4x4(m: np.ndarray, file: Path | str, member: str | None, what: str) -> np.ndarray:
    """A 3x4 or 4x4 [R|t] (millimetres) as a float64 4x4 in metres; R must be a rotation."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape not in ((3, 4), (4, 4)):
        raise bad(file, f"{what} has shape {list(m.shape)}, expected [3, 4] or [4, 4]", member)
    if not np.isfinite(m).all():
        raise bad(file, f"{what} has non-finite values", member)
    if m.shape == (4, 4) and not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
        raise bad(file, f"{what} last row is {m[3].tolist()}, expected [0, 0, 0, 1]", member)
    r = m[:3, :3]
    if not np.allclose(r @ r.T, np.eye(3), atol=1e-3) or np.linalg.det(r) < 0:
        raise bad(file, f"{what} rotation block is not a rotation (expected rigid [R|t])", member)
    out = np.eye(4)
    out[:3, :3] = r
    out[:3, 3] = m[:3, 3] * MM
    return out


def intrinsics(k: np.ndarray, file: Path | str, member: str | None, what: str) -> np.ndarray:
    """Checks a pinhole K (3x3, last row [0, 0, 1], positive focals) and returns it as float64."""
    k = np.asarray(k, dtype=np.float64)
    if k.shape != (3, 3):
        raise bad(file, f"{what} has shape {list(k.shape)}, expected [3, 3]", member)
    if not np.isfinite(k).all() or not np.allclose(k[2], [0, 0, 1]) or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise bad(
            file, f"{what} is not a pinhole K (expected [[fx,s,cx],[0,fy,cy],[0,0,1]])", member
        )
    return k


def neutral_of(frames: list[str], segment: dict[str, str], name: str, file: Path) -> str:
    """The lowest-numbered frame of segment `name` (ava-256 `data/utils.py` sorts the neutral
    segment's frames and takes the first)."""
    cands = [f for f in frames if segment[f] == name]
    if not cands:
        raise bad(file, f"no frame in segment {name!r} (needed to pick the neutral frame)")
    return min(cands, key=lambda f: (int(f) if f.isdigit() else 0, f))
