"""A drivable avatar: one identity's UPM bias maps + the shared decoder (FiCA Sec. 2.4).

FiCA's UPM is a hypernetwork: the identity encoder runs once per avatar and its bias maps then
condition a decoder shared by all identities (docs/architecture.md §5; the RGCA-style Gaussian
decoder of facebookresearch/goliath). `Avatar` keeps exactly what driving needs:
- the identity's bias maps (one per decoder level) and surfel frames
  (`upm_geometry.surface_frames`),
- its template maps (UV texture, neutral UV geometry, atlas mask),
- the decoder and expression-encoder params (the identity encoder is dropped),
and drives it with `drive(expression, view, gaze)` (jitted once per batch shape) and renders it
with `render(viewmat, K, width, height)`: the rasteriser is then called with concrete inputs, so
it counts the Gaussian-tile intersections and sizes its buffers to fit (no overflow, ever).

On disk an avatar is a folder: `avatar.safetensors` (or `arrays.npz` without the `safetensors`
package) and `avatar.json` (format, model config), each written to a temp file and renamed.
A driven frame exports as a standard 3DGS `.ply` (`fica_jax.render.ply`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from fica_jax.errors import UserError
from fica_jax.export.manifest import AVATAR_FORMAT, AVATAR_VERSION, read_arrays, read_manifest
from fica_jax.files import atomic_file, ensure_dir, write_json
from fica_jax.models.upm import UPM, UPMConfig, eye_masks, flatten, view_direction
from fica_jax.render import ply, rasterization

FORMAT, VERSION = AVATAR_FORMAT, AVATAR_VERSION
GAUSSIAN_KEYS = ("means", "quats", "scales", "opacities", "colors")


def _param_names(pure: dict) -> tuple[list[str], Any]:
    paths, treedef = jax.tree_util.tree_flatten_with_path(pure)
    return ["params" + jax.tree_util.keystr(p) for p, _ in paths], treedef


@functools.partial(jax.jit, static_argnums=0)
def _drive(graphdef, state, identity, maps, expression, view, gaze):
    m = nnx.merge(graphdef, state)
    mean, _ = m.encode_expression(expression)
    tex, geo, msk = (x[None] for x in maps)
    return flatten(m.decode(identity, tex, geo, msk, mean, view, gaze))


class Avatar:
    """One identity, drivable. Build with `Avatar.create(model, texture, geometry, mask)`."""

    def __init__(self, model: UPM, identity: dict, texture, geometry, mask, info=None):
        self.info = dict(info or {})  # provenance, expression names (saved in avatar.json)
        model = nnx.clone(model)  # the caller's (trained) model stays whole
        model.identity_encoder = None  # ran once; driving never needs it
        self.model = model
        self.cfg: UPMConfig = model.cfg
        # batch 1: broadcast against B frames by the decoder
        one = lambda x, k=3: jnp.asarray(x, jnp.float32).reshape(1, *np.shape(x)[-k:])
        self.identity = {"biases": [one(b) for b in identity["biases"]]}
        self.identity |= {k: one(identity[k]) for k in ("frame", "std")}
        if "eye_centres" in identity:
            self.identity["eye_centres"] = one(identity["eye_centres"], 2)
        self.texture = jnp.asarray(texture, jnp.float32)  # [R, R, 3]
        self.geometry = jnp.asarray(geometry, jnp.float32)  # [R, R, 3]
        self.mask = jnp.asarray(mask, jnp.float32)  # [R, R]
        graphdef, state = nnx.split(model)
        self._state = state
        # one jit for every avatar of the same architecture: traced once per batch size
        self._drive = functools.partial(_drive, graphdef)

    @classmethod
    def create(cls, model: UPM, texture, geometry, mask, info=None) -> Avatar:
        """Runs the identity encoder once. texture, geometry [R, R, 3], mask [R, R]; `info`: a
        JSON-able dict kept with the avatar (e.g. `expression_names`, `source`)."""
        ident = model.encode_identity(
            jnp.asarray(texture, jnp.float32)[None],
            jnp.asarray(geometry, jnp.float32)[None],
            jnp.asarray(mask, jnp.float32)[None],
        )
        return cls(model, ident, texture, geometry, mask, info)

    # ------------------------------------------------------------------ driving
    def drive(self, expression=None, view=None, gaze=None) -> dict[str, jax.Array]:
        """Gaussians for expression [E] (or [B, E]; None: neutral zeros), unit view direction
        [3] / [B, 3] (None: frontal +z) and gaze [2] / [B, 2] (None: straight):
        means [N, 3], quats [N, 4] (w, x, y, z), scales [N, 3], opacities [N], colors [N, 3]
        with N = R*R (a leading B when the inputs are batched)."""
        e_dim = self.cfg.expression_dim
        expression = jnp.zeros(e_dim) if expression is None else jnp.asarray(expression)
        batched = expression.ndim == 2
        b = expression.shape[0] if batched else 1
        fill = lambda x, default: jnp.broadcast_to(
            jnp.asarray(default if x is None else x, jnp.float32), (b, len(default))
        )
        out = self._drive(
            self._state,
            self.identity,
            (self.texture, self.geometry, self.mask),
            expression.reshape(b, e_dim).astype(jnp.float32),
            fill(view, (0.0, 0.0, 1.0)),
            fill(gaze, (0.0, 0.0)),
        )
        return out if batched else {k: v[0] for k, v in out.items()}

    def render(
        self,
        viewmat,  # [4, 4] world -> camera (OpenCV); the head sits at the world origin
        K,  # [3, 3]
        width: int,
        height: int,
        *,
        expression=None,  # [E]
        gaze=None,  # [2]
        background=None,  # [3]
        **raster_kwargs,
    ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        """One frame -> (image [H, W, 3], alpha [H, W], rasteriser meta), the view direction
        taken from the camera and eps2d from the model (what it was trained with) unless given.
        Intersections are counted first, so nothing overflows."""
        raster_kwargs.setdefault("eps2d", self.cfg.eps2d)
        viewmat = jnp.asarray(viewmat, jnp.float32)
        g = self.drive(expression, view_direction(viewmat), gaze)
        bg = None if background is None else jnp.asarray(background, jnp.float32)[None]
        img, alpha, meta = rasterization(
            *(g[k] for k in GAUSSIAN_KEYS),
            viewmat[None],
            jnp.asarray(K, jnp.float32)[None],
            width,
            height,
            backgrounds=bg,
            **raster_kwargs,
        )
        return img[0], alpha[0, ..., 0], meta

    def save_ply(self, path, expression=None, view=None, gaze=None) -> int:
        """Writes the driven frame's visible Gaussians (inside the UV atlas) as a 3DGS .ply;
        returns how many."""
        g = jax.device_get(self.drive(expression, view, gaze))
        keep = np.asarray(self.mask).reshape(-1) > 0.5
        ply.save_ply(path, *(np.asarray(g[k])[keep] for k in GAUSSIAN_KEYS))
        return int(keep.sum())

    # ------------------------------------------------------------------ disk
    def arrays(self) -> dict[str, np.ndarray]:
        pure = nnx.state(self.model, nnx.Param).to_pure_dict()
        names, _ = _param_names(pure)
        out = dict(zip(names, (np.asarray(x) for x in jax.tree.leaves(pure)), strict=True))
        for i, b in enumerate(self.identity["biases"]):
            out[f"bias/{i}"] = np.asarray(b)
        out |= {k: np.asarray(v) for k, v in self.identity.items() if k != "biases"}
        out |= {"texture": np.asarray(self.texture), "geometry": np.asarray(self.geometry)}
        out["mask"] = np.asarray(self.mask)
        if (eyes := eye_masks(self.cfg)) is not None:  # for runtimes without the template code
            out["eye_masks"] = np.asarray(eyes)  # [2, R, R]
        return out

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Writes `directory/avatar.safetensors` (or .npz) and `directory/avatar.json`."""
        d = ensure_dir(directory)
        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays().items()}
        name = "avatar.safetensors"
        with atomic_file(d / name) as tmp:
            save_file(arrays, tmp)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "arrays": name,
            "levels": len(self.identity["biases"]),
            "config": dataclasses.asdict(self.cfg),
            "info": self.info,
        }
        write_json(d / "avatar.json", meta)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Avatar:
        d, meta = read_manifest(directory, "avatar.json", FORMAT, VERSION, "Avatar.save")
        path = d / str(meta.get("arrays", ""))
        arrays = read_arrays(path)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        # abstract (no init work): every parameter it keeps is then read from the file
        model = nnx.eval_shape(lambda: UPM(UPMConfig(**fields), rngs=nnx.Rngs(0)))
        model.identity_encoder = None
        names, treedef = _param_names(nnx.state(model, nnx.Param).to_pure_dict())
        missing = [n for n in names if n not in arrays]
        if missing:
            raise UserError(f"{path} lacks {len(missing)} decoder arrays, e.g. {missing[0]}")
        nnx.update(model, treedef.unflatten([jnp.asarray(arrays[n]) for n in names]))
        identity = {"biases": [arrays[f"bias/{i}"] for i in range(meta["levels"])]}
        identity |= {k: arrays[k] for k in ("frame", "std", "eye_centres") if k in arrays}
        maps = (arrays["texture"], arrays["geometry"], arrays["mask"])
        return cls(model, identity, *maps, meta.get("info"))
