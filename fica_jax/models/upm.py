"""Universal prior model (UPM): identity hypernetwork + driven Gaussian decoder (FiCA Sec. 2.4).

FiCA's UPM (after Cao et al., SIGGRAPH 2022, open code facebookresearch/ava-256, with the
Gaussian primitives of RGCA, Saito et al., CVPR 2024, open code facebookresearch/goliath; facts
taken from both, no code copied, docs/architecture.md §5) turns an identity's UV texture T and
neutral UV geometry G into a drivable avatar of one Gaussian per UV texel:

  identity encoder (run once per avatar):
    [T*2-1, (G-c)/s, mask] [B, R, R, 7] -> conv3x3 at R, then 4x4 stride-2 convs down to 2*seed,
    LeakyReLU 0.2; at every level a 1x1 conv emits that resolution's bias maps for both decoder
    branches (ava-256 `models/encoders/identity.py`).
  expression encoder: frame expression code [B, E] -> MLP -> (mean, logvar) of latent e [B, Le];
    KL to N(0, I); the mean at drive time.
  Gaussian decoder: MLP(e) -> seed [B, s, s, C]; per level x2 nearest upsample + conv3x3,
    `x = (conv(x) + bias_i) / sqrt(2)`, LeakyReLU (ava-256 `models/decoders/rgb.py`); a conv head
    at R gives position offset, rotation, scale and opacity per texel.
  colour branch: the same structure on MLP(view) with, at its head, each texel's deformation
    from the geometry branch (stop-gradient offset) -> a view-dependent colour offset. The
    expression reaches the colour only through the deformation it causes, so what it does not
    move keeps its colour (with the code as input, the unseen back of the head did not).
  eyes: the gaze (yaw, pitch) turns each eyeball's texels rigidly about the eyeball's centre
    (a sphere fitted to its neutral texels, once per avatar), the capture's own eye model; the
    eye texels come from the UV layout's template (`eye_template`). RGCA likewise drives
    explicit eyeballs by gaze instead of feeding gaze to the decoder. With `eye_template=""`
    (a layout without known eyeballs) the gaze joins e as an input of both branches.

Per texel: mean = G + offset; rotation and scale relative to the texel's surfel frame on the
neutral surface G (`upm_geometry.py`: the flat tangent-plane Gaussians of `render/surfels.py`, as
RGCA keeps its Gaussians in the mesh's local frame; the eyeballs' centres and turning live there
too): quaternion (w, x, y, z) = frame * normalise(1 + dq), scale = surfel std-dev * softplus
(1 at init), soft-bounded by `max_scale`; opacity = sigmoid (0 outside the UV atlas); colour =
T + colour offset. The head's outputs are scaled by 0.1, so an untrained decoder renders the
surfel proxy of the neutral textured head, and training starts from the mesh proxy instead of
from blurry spheres. `zero_identity=True` zeroes every bias map: the issue's ablation (a)
"decoder without identity conditioning". `eps2d` is the rasteriser's screen-space dilation the
Gaussians are trained (and must be rendered) with.

Conv activations are pinned batch-sharded (`_conv`), as in `models/vae.py`: left free, jax
0.10.2's CPU partitioner may pick a channel-sharded layout that computes wrong values.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.geometry.template_store import named_uv_regions
from fica_jax.models import layers
from fica_jax.models.upm_geometry import eye_centres, surface_frames, turn_eyes
from fica_jax.render import rasterization
from fica_jax.render.project import quat_multiply

Array = jax.Array
_SOFTPLUS_INV_1 = math.log(math.e - 1.0)  # softplus(x) == 1


@dataclasses.dataclass(frozen=True)
class UPMConfig:
    """Sizes. Decoder levels run at 2*seed, 4*seed, ..., uv_resolution (one width each);
    `encoder_channels` are the identity encoder's widths from uv_resolution down to 2*seed."""

    uv_resolution: int = 32  # Gaussians per side (one per UV texel)
    expression_dim: int = 18  # E of the capture's expression codes
    latent_dim: int = 16  # expression latent e
    hidden: int = 64  # MLP widths (expression encoder, seed MLPs)
    seed_resolution: int = 4
    seed_channels: int = 32
    channels: tuple[int, ...] = (32, 32, 16)  # geometry branch, low -> high resolution
    color_channels: tuple[int, ...] = (16, 16, 16)  # view-dependent colour branch
    encoder_channels: tuple[int, ...] = (16, 32, 32)  # high -> low resolution
    n_cameras: int = 0  # per-camera 3x3 colour correction (0: none)
    offset_scale: float = 0.02  # m per unit of the (0.1-scaled) offset output
    color_scale: float = 1.0  # colour offset per unit of output
    footprint: float = 0.5  # initial in-plane std-dev, texels (render/surfels.py)
    thickness: float = 0.1  # initial std-dev along the normal, texels
    max_scale: float = 0.05  # m, soft upper bound of every scale
    opacity_init: float = 0.95
    position_center: tuple[float, float, float] = (0.0, -0.025, 0.02)
    position_extent: tuple[float, float, float] = (0.19, 0.19, 0.19)
    eps2d: float = 0.1  # the rasteriser's screen-space blur the Gaussians are trained under
    # explicit eyeballs: the UV layout's template (eye texel masks); "" feeds gaze to the decoder
    eye_template: str = "fica-procedural-head-r48"

    @property
    def levels(self) -> int:
        return len(self.channels)

    def validate(self) -> None:
        n = self.levels
        if self.seed_resolution * 2**n != self.uv_resolution:
            raise ValueError(
                f"uv_resolution {self.uv_resolution} != seed {self.seed_resolution} * 2^{n} "
                f"({n} decoder levels)"
            )
        if len(self.color_channels) != n or len(self.encoder_channels) != n:
            raise ValueError("channels, color_channels and encoder_channels need equal lengths")


VARIANTS: dict[str, UPMConfig] = {
    # CPU tests and demo: 32x32 Gaussians (1,024), 0.14M parameters.
    "tiny": UPMConfig(),
    # Paper scale: one Gaussian per texel of a 1024^2 layout (RGCA), 256-d expression latent
    # (goliath config/rgca_example.yml); widths are ours. 12.3M parameters.
    "paper": UPMConfig(
        uv_resolution=1024,
        latent_dim=256,
        hidden=256,
        seed_resolution=8,
        seed_channels=256,
        channels=(256, 256, 128, 128, 64, 32, 16),
        color_channels=(128, 128, 64, 64, 32, 16, 16),
        encoder_channels=(16, 32, 64, 64, 128, 128, 256),
        offset_scale=0.01,
        max_scale=0.01,
    ),
}


def _constrain(x: Array) -> Array:
    return shd.constrain(x, shd.BATCH, shd.HEIGHT, shd.WIDTH, shd.CHANNELS)


def _conv(conv: nnx.Conv, x: Array) -> Array:
    # batch-sharded, channel-replicated on both sides (module doc; models/vae.py `_conv`)
    return _constrain(conv(_constrain(x)))


def _vec(x: Array) -> Array:
    # MLP activations too: a feature-sharded [B, D] reshaped into the seed map otherwise ends
    # up in a layout the partitioner can only fix by full rematerialisation
    return shd.constrain(x, shd.BATCH, None)


def _leaky(x: Array) -> Array:
    return jax.nn.leaky_relu(x, 0.2)


def _up2(x: Array) -> Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def view_direction(viewmat: Array) -> Array:
    """Unit vector from the head (world origin) to the camera centre. [..., 4, 4] -> [..., 3]."""
    rot, t = viewmat[..., :3, :3], viewmat[..., :3, 3]
    centre = -jnp.einsum("...ji,...j->...i", rot, t)  # -R^T t
    return centre / jnp.maximum(jnp.linalg.norm(centre, axis=-1, keepdims=True), 1e-9)


def eye_masks(cfg: UPMConfig) -> Array | None:
    """[2, R, R] float32 UV masks of the left and right eyeball, None without explicit eyes."""
    if not cfg.eye_template:
        return None
    regions = named_uv_regions(cfg.eye_template, cfg.uv_resolution)
    return jnp.asarray(np.stack([regions["eye_left"], regions["eye_right"]]), jnp.float32)


class IdentityEncoder(nnx.Module):
    """[B, R, R, 7] UV maps -> bias maps {level i: [B, r_i, r_i, C_i + Ccol_i]}, low -> high."""

    def __init__(self, cfg: UPMConfig, *, rngs: nnx.Rngs, dtype):
        enc, n = cfg.encoder_channels, cfg.levels
        self.stem = layers.conv(7, enc[0], 3, rngs=rngs, dtype=dtype)
        self.downs = nnx.List(
            [layers.conv(enc[i - 1], enc[i], 4, stride=2, padding=1, rngs=rngs, dtype=dtype)
             for i in range(1, n)]
        )  # fmt: skip
        # encoder level j (resolution R / 2^j) feeds decoder level n - 1 - j
        out = [cfg.channels[n - 1 - j] + cfg.color_channels[n - 1 - j] for j in range(n)]
        self.to_bias = nnx.List(
            [layers.conv(enc[j], out[j], 1, rngs=rngs, dtype=dtype) for j in range(n)]
        )

    def __call__(self, x: Array) -> list[Array]:
        h = _leaky(_conv(self.stem, x))
        biases = [_conv(self.to_bias[0], h)]
        for down, to_bias in zip(self.downs, self.to_bias[1:], strict=True):
            h = _leaky(_conv(down, h))
            biases.append(_conv(to_bias, h))
        return [b.astype(jnp.float32) for b in reversed(biases)]


class ExpressionEncoder(nnx.Module):
    """Expression code [B, E] -> (mean, logvar) [B, latent] (the VAE bottleneck)."""

    def __init__(self, cfg: UPMConfig, *, rngs: nnx.Rngs, dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        self.fc1 = layers.linear(cfg.expression_dim, cfg.hidden, (shd.EMBED, shd.MLP), **kw)
        self.fc2 = layers.linear(cfg.hidden, cfg.hidden, (shd.MLP, shd.EMBED), **kw)
        self.out = layers.linear(cfg.hidden, 2 * cfg.latent_dim, (shd.EMBED, shd.MLP), **kw)

    def __call__(self, expression: Array) -> tuple[Array, Array]:
        h = _vec(_leaky(self.fc2(_vec(_leaky(self.fc1(expression))))))
        mean, logvar = jnp.split(_vec(self.out(h)).astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)


class Branch(nnx.Module):
    """MLP(condition) -> seed -> biased up-convs -> conv head. [B, D] -> [B, R, R, out]."""

    def __init__(self, cfg: UPMConfig, cond: int, widths, out: int, *, extra: int = 0, rngs, dtype):
        s, c0 = cfg.seed_resolution, cfg.seed_channels
        kw = dict(rngs=rngs, dtype=dtype)
        self.seed_shape = (s, s, c0)
        self.fc1 = layers.linear(cond, cfg.hidden, (shd.EMBED, shd.MLP), **kw)
        self.fc2 = layers.linear(cfg.hidden, s * s * c0, (shd.MLP, shd.EMBED), **kw)
        ins = (c0, *widths[:-1])
        self.convs = nnx.List(
            [layers.conv(a, b, 3, **kw) for a, b in zip(ins, widths, strict=True)]
        )
        self.head = layers.conv(widths[-1] + extra, out, 3, **kw)

    def __call__(self, cond: Array, biases: list[Array], extra: Array | None = None) -> Array:
        """`extra` [B, R, R, extra]: per-texel features joining the head's input."""
        h = _vec(_leaky(self.fc1(_vec(cond))))
        x = _leaky(_constrain(_vec(self.fc2(h)).reshape(cond.shape[0], *self.seed_shape)))
        for conv, bias in zip(self.convs, biases, strict=True):
            # ava-256 decoder: the identity bias joins each level, variance kept by 1/sqrt(2)
            x = _leaky((_conv(conv, _up2(x)).astype(jnp.float32) + bias) * (1 / math.sqrt(2)))
        if extra is not None:
            x = jnp.concatenate([x, extra.astype(x.dtype)], -1)
        return 0.1 * _conv(self.head, x).astype(jnp.float32)


class UPM(nnx.Module):
    """The universal prior model. Inputs per identity: texture, geometry [B, R, R, 3] (texture in
    [0, 1], geometry neutral, head coords, m), mask [B, R, R]; per frame: expression [B, E],
    view direction [B, 3], gaze [B, 2]. Identity arrays may have batch 1 against B frames."""

    GEOMETRY_OUT = 11  # offset 3, quaternion 4, scale 3, opacity 1

    def __init__(self, cfg: UPMConfig = VARIANTS["tiny"], *, rngs: nnx.Rngs, dtype=jnp.float32):
        cfg.validate()
        self.cfg, self.dtype = cfg, dtype
        kw = dict(rngs=rngs, dtype=dtype)
        self.identity_encoder = IdentityEncoder(cfg, **kw)
        self.expression_encoder = ExpressionEncoder(cfg, **kw)
        gaze = 0 if cfg.eye_template else 2  # explicit eyeballs take the gaze instead
        self.geometry = Branch(cfg, cfg.latent_dim + gaze, cfg.channels, self.GEOMETRY_OUT, **kw)
        # colour sees the view and, per texel, the geometry branch's deformation (not e itself)
        self.color = Branch(cfg, gaze + 3, cfg.color_channels, 3, extra=3, **kw)
        if cfg.n_cameras:
            eye = jnp.broadcast_to(jnp.eye(3), (cfg.n_cameras, 3, 3))
            self.color_correction = nnx.Param(eye, out_sharding=(None, None, None))
        else:
            self.color_correction = None

    # ------------------------------------------------------------------ per avatar
    def encode_identity(self, texture: Array, geometry: Array, mask: Array) -> dict[str, Array]:
        """-> {"biases": [per level [B, r, r, C + Ccol]], "frame": [B, R, R, 4] and "std":
        [B, R, R, 3], the neutral surface's surfel frames (`surface_frames`), and with explicit
        eyes "eye_centres": [B, 2, 3] (`eye_centres`)}."""
        m = mask[..., None].astype(jnp.float32)
        c = jnp.asarray(self.cfg.position_center, jnp.float32)
        s = jnp.asarray(self.cfg.position_extent, jnp.float32)
        x = jnp.concatenate([(texture * 2 - 1) * m, (geometry - c) / s * m, m], -1)
        biases = self.identity_encoder(x.astype(self.dtype))
        frame, std = surface_frames(geometry, mask, self.cfg.footprint, self.cfg.thickness)
        out = {"biases": biases, "frame": frame, "std": std}
        eyes = eye_masks(self.cfg)
        if eyes is not None:
            out["eye_centres"] = eye_centres(geometry, mask, eyes)
        return out

    # ------------------------------------------------------------------ per frame
    def encode_expression(self, expression: Array) -> tuple[Array, Array]:
        return self.expression_encoder(expression.astype(self.dtype))

    def decode(
        self,
        identity: dict[str, Array],
        texture: Array,  # [B|1, R, R, 3]
        geometry: Array,  # [B|1, R, R, 3]
        mask: Array,  # [B|1, R, R]
        latent: Array,  # [B, latent]
        view: Array,  # [B, 3] unit view direction
        gaze: Array,  # [B, 2]
        *,
        zero_identity: bool = False,
    ) -> dict[str, Array]:
        """Per-texel Gaussians: means [B,R,R,3], quats [B,R,R,4], scales [B,R,R,3],
        opacities [B,R,R], colors [B,R,R,3] (before any camera colour correction)."""
        cfg, b = self.cfg, latent.shape[0]
        biases = [jnp.broadcast_to(x, (b, *x.shape[1:])) for x in identity["biases"]]
        if zero_identity:
            biases = [jnp.zeros_like(x) for x in biases]
        widths = cfg.channels
        geo_bias = [x[..., :w] for x, w in zip(biases, widths, strict=True)]
        col_bias = [x[..., w:] for x, w in zip(biases, widths, strict=True)]
        eyes = eye_masks(cfg)
        cond = latent if eyes is not None else jnp.concatenate([latent, gaze], -1)
        cond = cond.astype(self.dtype)
        raw = self.geometry(cond, geo_bias)
        view_cond = view if eyes is not None else jnp.concatenate([view, gaze], -1)
        # the expression reaches the colour only through the local deformation it causes
        # (shading of moved skin, the mouth opening), so what expression does not move keeps
        # its colour; 10 * raw offset: ~1 per 2 mm at the default offset_scale
        deform = 10.0 * jax.lax.stop_gradient(raw[..., :3])
        col = self.color(view_cond.astype(self.dtype), col_bias, deform)

        # rotation and scale relative to the neutral surface's surfel frame (RGCA's Gaussians
        # live in the mesh's local frame): an untrained decoder renders the surfel proxy
        dq = raw[..., 3:7] + jnp.asarray([1.0, 0.0, 0.0, 0.0])
        quats = quat_multiply(jnp.broadcast_to(identity["frame"], dq.shape), dq)
        quats = quats / jnp.maximum(jnp.linalg.norm(quats, axis=-1, keepdims=True), 1e-9)
        s = identity["std"] * jax.nn.softplus(raw[..., 7:10] + _SOFTPLUS_INV_1)
        scales = cfg.max_scale * jnp.tanh(s / cfg.max_scale)  # soft bound, ~s when small
        opacity_logit = math.log(cfg.opacity_init / (1 - cfg.opacity_init))
        opacities = jax.nn.sigmoid(raw[..., 10] + opacity_logit) * (mask > 0.5)
        means = geometry + cfg.offset_scale * raw[..., :3]
        if eyes is not None:  # each eyeball turns rigidly about its centre (as the capture's)
            means, quats = turn_eyes(means, quats, eyes, identity["eye_centres"], gaze)
        return {
            "means": means,
            "quats": quats,
            "scales": scales,
            "opacities": opacities,
            "colors": texture + cfg.color_scale * col,
        }

    def correct_colors(self, colors: Array, camera: Array | None) -> Array:
        """Per-camera 3x3 colour correction of colors [B, ..., 3] by camera [B] (identity when
        the model has none or camera is None)."""
        if self.color_correction is None or camera is None:
            return colors
        m = jnp.take(self.color_correction[...], camera, axis=0, mode="clip")  # [B, 3, 3]
        flat = colors.reshape(colors.shape[0], -1, 3)
        return jnp.einsum("bij,bnj->bni", m, flat).reshape(colors.shape)

    def __call__(
        self,
        texture: Array,  # [B, R, R, 3]
        geometry: Array,  # [B, R, R, 3]
        mask: Array,  # [B, R, R]
        expression: Array,  # [B, E]
        viewmat: Array,  # [B, 4, 4]
        gaze: Array,  # [B, 2]
        rng: Array | None = None,
        *,
        zero_identity: bool = False,
    ) -> tuple[dict[str, Array], Array]:
        """Training forward: (Gaussians as in `decode`, KL [B]); e is sampled when rng is given,
        else the posterior mean."""
        identity = self.encode_identity(texture, geometry, mask)
        mean, logvar = self.encode_expression(expression)
        latent = mean
        if rng is not None:
            latent = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1)
        g = self.decode(
            identity,
            texture,
            geometry,
            mask,
            latent,
            view_direction(viewmat),
            gaze,
            zero_identity=zero_identity,
        )
        return g, kl


def flatten(g: dict[str, Array]) -> dict[str, Array]:
    """Per-texel maps [B, R, R, k] -> per-Gaussian arrays [B, R*R, k] ([B, R*R] for opacities)."""
    out = {}
    for k, v in g.items():
        b, r1, r2 = v.shape[:3]
        out[k] = v.reshape(b, r1 * r2, *v.shape[3:])
    return out


def render_batch(
    g: dict[str, Array],  # per-texel maps from `UPM.decode` ([B, R, R, k])
    viewmats: Array,  # [B, 4, 4] world -> camera (OpenCV)
    Ks: Array,  # [B, 3, 3]
    width: int,
    height: int,
    background: Array | None = None,  # [B, H, W, 3] image composited behind the Gaussians
    **raster_kwargs,
) -> dict[str, Array]:
    """One camera per avatar: image [B, H, W, 3], alpha [B, H, W], n_isects and isect_overflow
    [B] (`fica_jax.render.rasterization` vmapped over the batch; under jit its default
    intersection capacity applies and any overflow is counted, never silent)."""
    flat = flatten(g)

    def one(means, quats, scales, opacities, colors, viewmat, K):
        img, alpha, meta = rasterization(
            means, quats, scales, opacities, colors, viewmat[None], K[None], width, height,
            **raster_kwargs,
        )  # fmt: skip
        return img[0], alpha[0, ..., 0], meta["n_isects"][0], meta["isect_overflow"][0]

    keys = ("means", "quats", "scales", "opacities", "colors")
    # per device's examples: the renderer's kernels are not partitioned by XLA
    render = shd.per_batch_shard(jax.vmap(one))
    img, alpha, n, over = render(*(flat[k] for k in keys), viewmats, Ks)
    if background is not None:
        img = img + (1.0 - alpha[..., None]) * background
    return {"image": img, "alpha": alpha, "n_isects": n, "isect_overflow": over}
