"""Raw readers for public multi-view head-capture layouts (the I/O under `fica data convert`).

common.py     RawCamera, the RawCapture protocol, zip/image/matrix helpers and our conventions
ava256.py     open_ava256: Ava-256 capture folders (and Goliath heads: same decoder/ layout)
multiface.py  open_multiface: Multiface subject folders
ply.py        read_ply_vertices: vertex positions from ASCII / binary PLY

Every reader returns cameras, vertices and head poses in metres with OpenCV cameras and K at the
stored image size (pixel centres at +0.5), and raises `fica_jax.errors.UserError` with one line
naming the file (and zip member) for bad input.
"""

from data_pipelines.formats.ava256 import Ava256Capture, open_ava256
from data_pipelines.formats.common import RawCamera, RawCapture
from data_pipelines.formats.multiface import MultifaceCapture, open_multiface
from data_pipelines.formats.ply import read_ply_vertices, write_ply_vertices

__all__ = [
    "Ava256Capture",
    "MultifaceCapture",
    "RawCamera",
    "RawCapture",
    "open_ava256",
    "open_multiface",
    "read_ply_vertices",
    "write_ply_vertices",
]
