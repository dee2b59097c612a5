"""UV maps <-> the DiT's latent grid (docs/architecture.md §1 "32x32x16"; FiCA paper s.2.2 + supplement).

FiCA's diffusion model generates the avatar's UV texture and UV geometry maps in the SDXL VAE's
latent space; the supplement gives a 32x32x16 latent, patchified by the DiT with patch size 2.
With the defaults a 512x512 UV map is encoded to a 64x64x4 latent, pixel-unshuffled by 2 into
that 32x32x16 grid: 256 DiT tokens at patch 2, 1024 at patch 1 (`num_tokens`). Resolution and
factor stay configurable (`UVLatentConfig`; `unshuffle=4` gives 16x16x64).

The VAE was trained on images in [-1, 1]; geometry maps are not images, so each map kind has a
fixed, exactly invertible mapping to [-1, 1] (`normalize_map` / `denormalize_map`):

  texture   sRGB, uint8 [0, 255] (or float [0, 1])  y = x / 127.5 - 1 (float: 2x - 1)
  normal    unit vectors, already in [-1, 1]         y = clip(x, -1, 1); inverse renormalises
  position  surface positions (dataset units)        y = clip((x - center) / extent, -1, 1)
  mask      coverage in [0, 1]                       y = 2x - 1

`center`/`extent` (per axis) live in `MapStats`, estimated once over the training set or the
head template (`MapStats.from_positions`) and stored with the config (`to_dict`/`from_dict`):
they must be identical at train and test time. Positions outside `center +- extent` are clipped
(the only lossy step; `from_positions` adds a margin so the data never reach it).

With a per-texel *reference* map (`MapStats.with_reference`: the training split's mean neutral
geometry, i.e. the mean-shape template in UV space, at the resolution the VAE trains at; maps of
another size are refused) the centre is that map and `extent` is the
half-width of the residual: a head spans ~+-190 mm but identities differ from the mean shape by
<~30 mm, so the VAE spends its [-1, 1] range on what varies and its reconstruction error in mm
shrinks by the same factor. The map itself is not in `to_dict` (it is an array); its digest is,
so a consumer holding another reference is refused. Texels outside
the UV layout's mask are set to a fixed value before encoding (black texture, zero normal,
centre position) so the VAE never sees undefined data, and to zero in output space on decoding.

The normalisations run on numpy arrays (data pipelines) and on jax arrays (inside jit) alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.errors import UserError
from fica_jax.models import layers

KINDS = ("texture", "normal", "position", "mask")


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class UVLatentConfig:
    """UV map [B, R, R, 3] -> latent [B, R/f, R/f, C] -> token grid [B, G, G, C*u*u].

    f = vae_factor (8 for SDXL), u = unshuffle, G = R / (f * u).
    """

    uv_resolution: int = 512
    vae_factor: int = 8
    latent_channels: int = 4
    unshuffle: int = 2

    def __post_init__(self):
        step = self.vae_factor * self.unshuffle
        if min(self.uv_resolution, self.vae_factor, self.latent_channels, self.unshuffle) < 1:
            raise UserError(f"UVLatentConfig fields must be positive: {self}")
        if self.uv_resolution % step:
            raise UserError(
                f"uv_resolution {self.uv_resolution} is not divisible by vae_factor x unshuffle"
                f" = {step}"
            )

    @property
    def latent_resolution(self) -> int:
        return self.uv_resolution // self.vae_factor

    @property
    def grid(self) -> int:
        return self.latent_resolution // self.unshuffle

    @property
    def token_channels(self) -> int:
        return self.latent_channels * self.unshuffle**2

    def num_tokens(self, patch: int = 1) -> int:
        """DiT sequence length when the DiT patchifies the grid with `patch`."""
        if self.grid % patch:
            raise UserError(f"latent grid {self.grid} is not divisible by DiT patch {patch}")
        return (self.grid // patch) ** 2


@dataclasses.dataclass(frozen=True)
class MapStats:
    """Constants of the geometry normalisation (positions in the dataset's units)."""

    position_center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    position_extent: tuple[float, float, float] = (1.0, 1.0, 1.0)  # half-widths, > 0
    texture_background: float = -1.0  # normalised value of texels outside the mask (black)
    geometry_background: float = 0.0  # normal / position / mask outside the mask
    reference_digest: str = ""  # of `position_reference`; "" = no reference (centre per axis)
    # [R, R, 3] per-texel centre of the position normalisation (see the module docstring)
    position_reference: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if len(self.position_center) != 3 or len(self.position_extent) != 3:
            raise UserError(f"MapStats needs 3 values for center and extent: {self}")
        if min(self.position_extent) <= 0:
            raise UserError(f"MapStats position_extent must be positive: {self.position_extent}")
        if self.position_reference is not None:
            ref = np.asarray(self.position_reference)
            if ref.ndim != 3 or ref.shape[-1] != 3:
                raise UserError(f"MapStats position_reference must be [R, R, 3]; got {ref.shape}")
            if reference_digest(ref) != self.reference_digest:
                raise UserError(
                    f"MapStats: the position reference map (digest {reference_digest(ref)}) is "
                    f"not the one these statistics were made with ({self.reference_digest})"
                )
        elif self.reference_digest:
            raise UserError(
                f"MapStats reference_digest {self.reference_digest} given without its map"
            )

    def with_reference(self, reference: np.ndarray) -> MapStats:
        """These statistics centred on a per-texel reference map [R, R, 3] (dataset units);
        `position_extent` becomes the half-width of the residual."""
        ref = np.asarray(reference, np.float32)
        return dataclasses.replace(
            self, position_reference=ref, reference_digest=reference_digest(ref)
        )

    def center(self, xp=np, x=None):
        """The normalisation centre: the reference map [R, R, 3] or the per-axis centre [3].
        With position maps `x` [..., H, W, 3] a reference must be H x W (else a `UserError`)."""
        if self.position_reference is None:
            return xp.asarray(self.position_center, xp.float32)
        ref = xp.asarray(self.position_reference, xp.float32)
        if x is not None and tuple(x.shape[-3:-1]) != ref.shape[:2]:
            (h, w), r = x.shape[-3:-1], ref.shape[0]
            raise UserError(
                f"position maps of {h}x{w} texels, but their MapStats position reference is "
                f"{r}x{r} (the VAE run's config data.uv_resolution={r}); expected {r}x{r} maps: "
                f"resample them to {r} or train the VAE at data.uv_resolution={h}"
            )
        return ref

    @classmethod
    def from_positions(
        cls,
        positions: np.ndarray,  # [..., H, W, 3]
        mask: np.ndarray | None = None,  # [..., H, W] or [..., H, W, 1]; > 0.5 = inside
        *,
        margin: float = 1.1,
        isotropic: bool = True,
    ) -> MapStats:
        """Centre = mid-range of the valid texels; extent = half-range x margin.

        Isotropic (one extent for x, y, z) keeps the head's proportions in latent space.
        """
        p = np.asarray(positions, np.float64).reshape(-1, 3)
        if mask is not None:
            p = p[np.asarray(mask).reshape(-1) > 0.5]
        if p.size == 0:
            raise UserError("MapStats.from_positions: no valid texels under the mask")
        lo, hi = p.min(0), p.max(0)
        center = (lo + hi) / 2
        half = np.maximum((hi - lo) / 2, 1e-6) * margin
        if isotropic:
            half = np.full(3, half.max())
        return cls(tuple(float(c) for c in center), tuple(float(h) for h in half))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields; the reference map travels separately (its digest is here)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "position_reference"
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], reference: np.ndarray | None = None) -> MapStats:
        """Inverse of `to_dict`; `reference` is the map whose digest `d` names (if any)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"position_reference"}
        if set(d) - known:
            raise UserError(f"MapStats: unknown keys {sorted(set(d) - known)}; known {known}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if kw.get("reference_digest") and reference is None:
            raise UserError(
                f"MapStats: these statistics are centred on a reference map (digest "
                f"{kw['reference_digest']}) that was not supplied"
            )
        ref = None if reference is None or not kw.get("reference_digest") else reference
        return cls(**kw, position_reference=None if ref is None else np.asarray(ref, np.float32))


def reference_digest(reference: np.ndarray) -> str:
    """sha256 of a reference map's float32 bytes and shape (first 16 hex digits)."""
    ref = np.ascontiguousarray(np.asarray(reference, np.float32))
    return hashlib.sha256(str(ref.shape).encode() + ref.tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- packing
# Pixel (un)shuffle lives in `fica_jax.models.layers` (one copy, shared with the DiT patchify).


# ----------------------------------------------------------------------------- normalisation
def _xp(x):
    return jnp if isinstance(x, jax.Array) else np  # tracers are jax.Arrays too


def _mask(mask, x):
    """Mask [..., H, W] or [..., H, W, 1] -> boolean broadcastable against x [..., H, W, C]."""
    xp = _xp(mask)
    m = xp.asarray(mask)
    if m.ndim == x.ndim - 1:
        m = m[..., None]
    return m > 0.5


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown UV map kind {kind!r}; expected one of {KINDS}")


def normalize_map(
    kind: str,
    x,  # [..., H, W, C]
    stats: MapStats = MapStats(),
    mask=None,  # [..., H, W(, 1)]; > 0.5 = inside the UV layout
):
    """Maps a UV map of `kind` to float32 in [-1, 1] (table in the module docstring)."""
    _check_kind(kind)
    xp = _xp(x)
    if kind == "texture":
        integer = np.issubdtype(np.dtype(x.dtype), np.integer)
        y = xp.asarray(x, xp.float32) / 127.5 - 1.0 if integer else 2.0 * x - 1.0
    elif kind == "position":
        extent = xp.asarray(stats.position_extent, xp.float32)
        y = (x - stats.center(xp, x)) / extent
    elif kind == "mask":
        y = 2.0 * x - 1.0
    else:  # normal
        y = x
    y = xp.clip(xp.asarray(y, xp.float32), -1.0, 1.0)
    if mask is not None:
        bg = stats.texture_background if kind == "texture" else stats.geometry_background
        y = xp.where(_mask(mask, y), y, xp.float32(bg))
    return y


def denormalize_map(
    kind: str,
    y,  # [..., H, W, C] in [-1, 1]
    stats: MapStats = MapStats(),
    mask=None,  # [..., H, W(, 1)]; texels outside are set to 0 in output space
    *,
    uint8: bool = False,
):
    """Inverse of `normalize_map` (exact up to float rounding inside the clip range).

    texture -> float [0, 1], or uint8 [0, 255] with `uint8=True` (bit-exact round trip of uint8
    input); normal -> unit vectors; position -> dataset units; mask -> [0, 1].
    """
    _check_kind(kind)
    xp = _xp(y)
    y = xp.asarray(y, xp.float32)
    if kind == "texture":
        x = xp.clip((y + 1.0) * 0.5, 0.0, 1.0)
    elif kind == "position":
        x = y * xp.asarray(stats.position_extent, xp.float32) + stats.center(xp, y)
    elif kind == "mask":
        x = xp.clip((y + 1.0) * 0.5, 0.0, 1.0)
    else:  # decoded normals are not unit length: project back onto the sphere
        n = xp.sqrt(xp.sum(y * y, axis=-1, keepdims=True))
        x = y / xp.maximum(n, 1e-6)
    if mask is not None:
        x = xp.where(_mask(mask, x), x, xp.float32(0.0))
    if uint8:
        if kind != "texture":
            raise ValueError(f"uint8 output is only defined for textures, not {kind!r}")
        x = xp.round(x * 255.0).astype(xp.uint8)
    return x


# ----------------------------------------------------------------------------- VAE round trip
def _check_vae(vae, cfg: UVLatentConfig) -> None:
    if vae.cfg.spatial_factor != cfg.vae_factor or vae.cfg.latent_channels != cfg.latent_channels:
        raise UserError(
            f"UVLatentConfig(vae_factor={cfg.vae_factor}, latent_channels={cfg.latent_channels}) "
            f"does not match the VAE (factor {vae.cfg.spatial_factor}, "
            f"{vae.cfg.latent_channels} latent channels)"
        )


def encode_uv_maps(
    vae,  # fica_jax.models.vae.AutoencoderKL
    maps: Mapping[str, jax.Array],  # kind -> [B, R, R, C] raw maps (see normalize_map)
    rng: jax.Array | None,  # posterior sample key; None = posterior mean
    *,
    cfg: UVLatentConfig = UVLatentConfig(),
    stats: MapStats = MapStats(),
    mask: jax.Array | None = None,  # [B, R, R(, 1)] UV-layout mask shared by all kinds
) -> dict[str, jax.Array]:
    """Normalises, VAE-encodes (scaled diffusion latent) and packs each map.

    Returns kind -> token grid [B, G, G, C*u*u]. All kinds go through the VAE as one batch;
    single-channel maps (masks) are tiled to the VAE's input channels.
    """
    _check_vae(vae, cfg)
    kinds: Sequence[str] = list(maps)
    xs = []
    for kind in kinds:
        x = jnp.asarray(normalize_map(kind, maps[kind], stats, mask))
        if x.shape[1:3] != (cfg.uv_resolution, cfg.uv_resolution):
            raise ValueError(f"{kind} map is {x.shape}; expected [B, {cfg.uv_resolution}]*2 x C")
        if x.shape[-1] == 1:
            x = jnp.repeat(x, vae.cfg.in_channels, axis=-1)
        xs.append(x)
    sizes = [x.shape[0] for x in xs]
    z = vae.encode_to_latent(jnp.concatenate(xs, axis=0), rng)
    parts = jnp.split(z, np.cumsum(sizes)[:-1], axis=0)
    return {k: layers.pixel_unshuffle(p, cfg.unshuffle) for k, p in zip(kinds, parts, strict=True)}


def decode_uv_maps(
    vae,  # fica_jax.models.vae.AutoencoderKL
    grids: Mapping[str, jax.Array],  # kind -> [B, G, G, C*u*u] scaled latent token grids
    *,
    cfg: UVLatentConfig = UVLatentConfig(),
    stats: MapStats = MapStats(),
    mask: jax.Array | None = None,  # [B, R, R(, 1)]
) -> dict[str, jax.Array]:
    """Unpacks, VAE-decodes and denormalises: kind -> map [B, R, R, C] (masks [B, R, R, 1])."""
    _check_vae(vae, cfg)
    kinds = list(grids)
    zs = [layers.pixel_shuffle(grids[k], cfg.unshuffle) for k in kinds]
    x = vae.decode_from_latent(jnp.concatenate(zs, axis=0))
    parts = jnp.split(x, np.cumsum([z.shape[0] for z in zs])[:-1], axis=0)
    out = {}
    for kind, p in zip(kinds, parts, strict=True):
        if kind == "mask":  # encoded tiled: average the channels back to one
            p = jnp.mean(p, axis=-1, keepdims=True)
        out[kind] = denormalize_map(kind, p, stats, mask)
    return out
