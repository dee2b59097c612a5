"""Feed-forward UV refiner: a U-Net over UV texture + geometry with cross-attention to image
features (FiCA Sec. 2.3).

The diffusion model's maps are plausible but not aligned with the portrait; FiCA edits them once,
feed-forward, with a U-Net whose lower levels cross-attend to dense features of (a) the reference
portrait and (b) a rendering of the current avatar from the portrait's camera, both from a
Sapiens ViT. Here:

  input   [T*2-1, (G-c)/s, mask] * mask  [B, R, R, 7]  (geometry normalised by the position
          centre c / extent s, as the UPM's identity encoder does, `models/upm.py`)
  U-Net   conv3x3 stem -> per level: resnet (+ cross-attention on the lowest `attn_levels`
          levels) -> stride-2 down; bottleneck resnet + cross-attention; up: nearest x2 + conv,
          concat skip, resnet (+ cross-attention) -> GroupNorm-SiLU-conv3x3 head to 6 channels
          (the resnets, down and up blocks are the VAE's, `models/vae.py`)
  context the ViT of `models/vit.py` (the dense predictor's Sapiens-style backbone, at a tiny
          size for CPU) runs on portrait and render in one batch; its tokens, plus a learned
          embedding of which image they come from, are the keys/values of every cross-attention.
          `vit_trainable=False` stops its gradient (frozen features; with the loop's AdamW a
          zero gradient moves nothing while weight decay is 0).
  cues    optional pixel-aligned UV inputs concatenated to the 7 channels (the stage passes
          the portrait and the render pulled back into UV with a visibility mask; ours, see
          `stages/refiner.py` `uv_cues`)
  evidence (`evidence=True`, ours) 7 more cues, the portrait's de-lit colours where it shows
          the head (`infer.evidence.evidence_cues`), and a 1x1 conv from all the cues added to
          the texture update. Without it the U-Net returns its input at demo scale: trained on
          the DiT's landmark-fitted maps, 200 steps, its L1 to the true texture stays where it
          starts on the training identities too, with or without the evidence as plain cues;
          with the direct path the refined texture moves towards the evidence
          (docs/architecture.md, "What the refiner learns at this scale").
  output  refined T = T + 0.5 * d[..., :3], G = G + s * d[..., 3:], inside the mask only. The
          head (and skip) convs are zero-initialised (as DiT zero-initialises its output layer),
          so at init the refiner returns its input maps exactly and training starts from the
          DiT's maps.

Conv activations are pinned batch-sharded (`vae._conv`): jax 0.10.2's CPU partitioner may pick a
channel-sharded conv layout that computes wrong values (the note in `models/vae.py`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.models import layers, vae, vit

Array = jax.Array
# `infer.evidence.evidence_cues`: albedo x weight, weight, weight x (albedo - texture)
EVIDENCE_CUES = 7


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """Sizes. Level i runs at uv_resolution / 2^i with `channels[i]` features; the last
    `attn_levels` levels (and the bottleneck) cross-attend to the ViT tokens."""

    uv_resolution: int = 32
    channels: tuple[int, ...] = (16, 32, 32)
    attn_levels: int = 2
    heads: int = 2
    groups: int = 8  # GroupNorm groups of every resnet
    vit: str = "tiny"  # a models/vit.py VARIANTS name
    vit_patch: int = 8  # the tiny ViT on 32-64 px portraits: a 4x4-8x8 token grid
    vit_trainable: bool = True
    image_size: int = 32  # portrait / render side the ViT sees
    cue_channels: int = 7  # extra pixel-aligned UV inputs (the stage's `uv_cues`; 0: none)
    # 7 more cue channels, the portrait's de-lit colours (`infer.evidence.evidence_cues`), and a
    # zero-initialised 1x1 conv from all the cues straight to the texture update (module doc)
    evidence: bool = False
    position_center: tuple[float, float, float] = (0.0, -0.025, 0.02)
    position_extent: tuple[float, float, float] = (0.19, 0.19, 0.19)

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def cues(self) -> int:
        """Cue channels the refiner reads: `cue_channels`, plus the evidence's."""
        return self.cue_channels + EVIDENCE_CUES * self.evidence

    def vit_config(self) -> vit.ViTConfig:
        base = vit.VARIANTS[self.vit]
        return dataclasses.replace(
            base, patch=self.vit_patch or base.patch, image_size=(self.image_size,) * 2
        )

    def validate(self) -> None:
        if self.uv_resolution % 2 ** (self.levels - 1):
            raise ValueError(
                f"uv_resolution {self.uv_resolution} is not divisible by 2^{self.levels - 1} "
                f"({self.levels} U-Net levels)"
            )
        if not 0 <= self.attn_levels <= self.levels:
            raise ValueError(f"attn_levels {self.attn_levels} not in [0, {self.levels}]")
        if self.vit not in vit.VARIANTS:
            raise ValueError(f"vit {self.vit!r} unknown; expected one of {sorted(vit.VARIANTS)}")


VARIANTS: dict[str, RefinerConfig] = {
    # CPU tests: 32^2 maps, 3 levels (32, 16, 8), attention at 16 and 8; tiny ViT. ~0.15M params.
    "tiny": RefinerConfig(),
    # Paper scale: FiCA's 512^2 UV maps (the SDXL-VAE resolution of the DiT), five levels
    # (512 .. 32), cross-attention at 64 and 32 and the bottleneck, to Sapiens-1B (frozen, as
    # the dense predictor's fine-tuned backbone) on 1024 px portraits. Widths are ours.
    "paper": RefinerConfig(
        uv_resolution=512,
        channels=(64, 128, 256, 512, 512),
        heads=8,
        groups=32,
        vit="1b",
        vit_patch=16,
        vit_trainable=False,
        image_size=1024,
    ),
}


class CrossAttention(nnx.Module):
    """Pre-norm multi-head cross-attention, residual: UV features x [B, h, w, C] attend to
    context tokens [B, M, D] -> [B, h, w, C]. Projections sharded over heads."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, groups: int, *, rngs, dtype):
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dtype = heads, dtype
        kw = dict(rngs=rngs, dtype=dtype)
        self.norm = layers.group_norm(dim, groups=groups, rngs=rngs)
        self.q = layers.linear(dim, dim, (shd.EMBED, shd.HEADS), **kw)
        self.k = layers.linear(ctx_dim, dim, (shd.EMBED, shd.HEADS), **kw)
        self.v = layers.linear(ctx_dim, dim, (shd.EMBED, shd.HEADS), **kw)
        self.out = layers.linear(dim, dim, (shd.HEADS, shd.EMBED), **kw)

    def __call__(self, x: Array, ctx: Array) -> Array:
        b, h, w, c = x.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads)
        q = split(self.q(self.norm(x).reshape(b, h * w, c).astype(self.dtype)))
        k, v = split(self.k(ctx)), split(self.v(ctx))
        q = shd.constrain(q, shd.BATCH, shd.LENGTH, shd.HEADS, shd.HEAD_DIM)
        logits = jnp.einsum("BNHK,BMHK->BHNM", q, k).astype(jnp.float32)
        probs = jax.nn.softmax(logits / jnp.sqrt(c // self.heads), axis=-1).astype(v.dtype)
        o = jnp.einsum("BHNM,BMHK->BNHK", probs, v).reshape(b, h * w, c)
        y = self.out(o).reshape(b, h, w, c).astype(x.dtype)
        return vae._constrain(x + y)


class Level(nnx.Module):
    """One U-Net level: resnet cin -> cout, then cross-attention when `attend`."""

    def __init__(self, cin, cout, cfg: RefinerConfig, ctx_dim, attend: bool, *, rngs, dtype):
        self.res = vae.ResnetBlock(cin, cout, cfg.groups, rngs=rngs, dtype=dtype)
        self.attn = (
            CrossAttention(cout, ctx_dim, cfg.heads, cfg.groups, rngs=rngs, dtype=dtype)
            if attend
            else None
        )

    def __call__(self, x: Array, ctx: Array) -> Array:
        x = self.res(x)
        return x if self.attn is None else self.attn(x, ctx)


class Refiner(nnx.Module):
    """UV maps + portrait + render of the maps -> refined UV maps (module doc).

    texture, geometry [B, R, R, 3] (texture in [0, 1], geometry in head coordinates, m),
    mask [B, R, R]; portrait, render [B, S, S, 3] in [0, 1]. Returns (texture, geometry)."""

    def __init__(self, cfg: RefinerConfig = VARIANTS["tiny"], *, rngs: nnx.Rngs, dtype=jnp.float32):
        cfg.validate()
        self.cfg, self.dtype = cfg, dtype
        ch, n, kw = cfg.channels, cfg.levels, dict(rngs=rngs, dtype=dtype)
        vcfg = cfg.vit_config()
        self.vit = vit.ViT(vcfg, **kw)
        self.source = nnx.Param(jnp.zeros((2, vcfg.width)), out_sharding=(None, shd.EMBED))
        attend = [i >= n - cfg.attn_levels for i in range(n)]
        d = vcfg.width
        self.stem = layers.conv(7 + cfg.cues, ch[0], 3, **kw)
        self.down = nnx.List([Level(ch[i], ch[i], cfg, d, attend[i], **kw) for i in range(n)])
        self.pool = nnx.List(
            [layers.conv(ch[i], ch[i + 1], 4, stride=2, padding=1, **kw) for i in range(n - 1)]
        )
        self.mid = Level(ch[-1], ch[-1], cfg, d, cfg.attn_levels > 0, **kw)
        self.up = nnx.List([vae.Upsample(ch[i + 1], **kw) for i in range(n - 1)])
        self.fuse = nnx.List(
            [Level(ch[i] + ch[i + (i < n - 1)], ch[i], cfg, d, attend[i], **kw) for i in range(n)]
        )
        self.out_norm = layers.group_norm(ch[0], groups=cfg.groups, rngs=rngs)
        self.head = layers.conv(ch[0], 6, 3, zero_init=True, **kw)
        self.skip = layers.conv(cfg.cues, 3, 1, zero_init=True, **kw) if cfg.evidence else None

    def context(self, portrait: Array, render: Array) -> Array:
        """ViT tokens of both images plus their source embedding -> [B, 2 h w, D]."""
        b = portrait.shape[0]
        feats = self.vit(vit.normalize(jnp.concatenate([portrait, render])))  # [2B, h, w, D]
        if not self.cfg.vit_trainable:
            feats = jax.lax.stop_gradient(feats)
        feats = feats.reshape(2, b, -1, feats.shape[-1]) + self.source[...][:, None, None]
        ctx = jnp.concatenate([feats[0], feats[1]], axis=1)
        return shd.constrain(ctx, shd.BATCH, shd.LENGTH, shd.EMBED).astype(self.dtype)

    def delta(self, x: Array, ctx: Array) -> Array:
        """The U-Net: normalised maps [B, R, R, 7] -> update [B, R, R, 6] (zero at init)."""
        h = vae._conv(self.stem, x.astype(self.dtype))
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, ctx)
            skips.append(h)
            if i < len(self.pool):
                h = vae._conv(self.pool[i], h)
        h = self.mid(h, ctx)
        for i in reversed(range(len(self.fuse))):
            if i < len(self.up):
                h = self.up[i](h)
            h = self.fuse[i](jnp.concatenate([skips[i], h], axis=-1), ctx)
        h = nnx.silu(self.out_norm(h)).astype(self.dtype)
        return vae._conv(self.head, h).astype(jnp.float32)

    def __call__(
        self,
        texture: Array,  # [B, R, R, 3]
        geometry: Array,  # [B, R, R, 3]
        mask: Array,  # [B, R, R]
        portrait: Array,  # [B, S, S, 3]
        render: Array,  # [B, S, S, 3]
        cues: Array | None = None,  # [B, R, R, cfg.cues]
    ) -> tuple[Array, Array]:
        m = mask[..., None].astype(jnp.float32)
        c = jnp.asarray(self.cfg.position_center, jnp.float32)
        s = jnp.asarray(self.cfg.position_extent, jnp.float32)
        parts = [(texture * 2 - 1) * m, (geometry - c) / s * m, m]
        if self.cfg.cues:
            if cues is None or cues.shape[-1] != self.cfg.cues:
                raise ValueError(f"the refiner expects {self.cfg.cues} cue channels")
            parts.append(cues * 2 - 1)
        x = jnp.concatenate(parts, -1)
        d = self.delta(x, self.context(portrait, render)) * m
        if self.skip is not None:  # the evidence's own path to the texture (module doc)
            # added as 2x into d (halved below): this form is the demo record's computation
            direct = vae._conv(self.skip, cues.astype(self.dtype)).astype(jnp.float32)
            d = d.at[..., :3].add(2 * direct * m)
        # adding an exact zero keeps the input maps bit for bit at init
        return texture + 0.5 * d[..., :3], geometry + s * d[..., 3:]
