"""Sapiens ViT backbone and the FiCA dense predictor (docs/architecture.md §6; FiCA Sec. 2.1).

Sapiens is a plain pre-LN ViT: 16x16 patch conv, learned absolute positions, NO class token,
LayerNorm eps 1e-6, fused qkv with bias, exact-GELU MLP x4, final LayerNorm; input 1024x768.
FiCA fine-tunes it to predict per-pixel UV coordinates, vertex positions and normals; we add a
foreground-mask head. `DensePredictor` = backbone + four `DenseHead`s + mean-pooled features
(an image embedding when no CLIP weights exist) + optionally the head-pose / expression regressor
(`pose_head.PoseHead`, `ViTConfig.pose_head`).

Blocks are stacked on a `LAYERS` axis with `nnx.vmap` and run with `nnx.scan`, so a 40-block model
compiles one block; `remat` names a policy from `fica_jax.models.remat`. With a bf16 compute dtype
the matmuls run in bf16 while norms, softmax and the residual stream stay float32.

`load_sapiens` imports a public Sapiens `.pth` (mmpretrain/mmseg key names, see `sapiens_to_nnx`).
The `Encoder` here is shared with the CLIP image encoder (`fica_jax.models.clip`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.errors import UserError
from fica_jax.models import layers, weights
from fica_jax.models import remat as remat_lib
from fica_jax.models.dense_heads import DenseHead, PixelBranch
from fica_jax.models.landmarks import LandmarkNet
from fica_jax.models.pose_head import PoseHead

# Sapiens' pixel normalisation, on 0..255 values (docs/architecture.md §6).
SAPIENS_MEAN = (123.675, 116.28, 103.53)
SAPIENS_STD = (58.395, 57.12, 57.375)
# Output channels of the dense heads, in the order of the returned dict.
HEADS = {"uv": 2, "vtx": 3, "nrm": 3, "mask_logits": 1}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A Sapiens-style ViT and its dense heads. Sizes are (width, depth, heads)."""

    width: int
    depth: int
    heads: int
    mlp_ratio: int = 4
    patch: int = 16
    image_size: tuple[int, int] = (1024, 768)  # (H, W); the position-embedding grid * patch
    eps: float = 1e-6
    remat: str = "none"  # a policy name from fica_jax.models.remat.REMAT_NAMES
    head_channels: int = 768  # Sapiens' VitHead deconv width
    head_convs: int = 0  # extra 1x1 conv + IN + SiLU layers (Sapiens' seg heads use 2)
    final_upsample: int = 2  # bilinear factor after the x8 deconvs: stride 2 -> full res
    pose_head: bool = False  # add the head-pose / expression regressor (models/pose_head.py)
    expression_dim: int = 0  # its expression code size (the template's blendshapes)
    pose_hidden: int = 256  # its MLP width
    landmarks: int = 0  # > 0: the landmark branch (models/landmarks.py), source of the expression
    pixel_branch: int = 0  # > 0: a full-resolution conv branch this wide feeds every head

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.image_size
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {self.image_size} is not a multiple of {self.patch}")
        return h // self.patch, w // self.patch


VARIANTS: dict[str, ViTConfig] = {
    "0.3b": ViTConfig(1024, 24, 16),
    "0.6b": ViTConfig(1280, 32, 16),
    "1b": ViTConfig(1536, 40, 24),
    "2b": ViTConfig(1920, 48, 32),
    "tiny": ViTConfig(32, 2, 2, image_size=(64, 48), head_channels=16),
}

gelu_exact = functools.partial(jax.nn.gelu, approximate=False)  # torch nn.GELU()


# ----------------------------------------------------------------------------- encoder
class Block(nnx.Module):
    """Pre-LN transformer block: x += attn(ln1(x)); x += mlp(ln2(x)). x: [B, N, D] float32."""

    def __init__(
        self, width, heads, hidden, *, eps, act, rngs, dtype=None, param_dtype=jnp.float32
    ):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.ln1 = layers.layer_norm(width, eps=eps, **kw)
        self.attn = layers.Attention(width, heads, dtype=dtype, **kw)
        self.ln2 = layers.layer_norm(width, eps=eps, **kw)
        self.mlp = layers.Mlp(width, hidden, act=act, dtype=dtype, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        # The residual stream stays float32; only the projections run in the compute dtype.
        x = x + self.attn(self.ln1(x)).astype(jnp.float32)
        x = x + self.mlp(self.ln2(x)).astype(jnp.float32)
        return shd.constrain(x, shd.BATCH, shd.LENGTH, shd.EMBED)


class Encoder(nnx.Module):
    """`depth` Blocks stacked on a LAYERS axis (params [depth, ...]) and run with `nnx.scan`."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        hidden: int,
        *,
        eps: float,
        act: Callable,
        remat: remat_lib.Remat = "none",
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        self.depth, self.remat = depth, remat
        kw = dict(eps=eps, act=act, dtype=dtype, param_dtype=param_dtype)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: shd.LAYERS})
        def make_blocks(rngs):
            return Block(width, heads, hidden, rngs=rngs, **kw)

        self.blocks = make_blocks(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, N, D] -> [B, N, D] float32
        return layers.scan_blocks(self.blocks, x.astype(jnp.float32), self.remat)


# ----------------------------------------------------------------------------- backbone
def resize_pos_embed(pos: jax.Array, src: tuple[int, int], dst: tuple[int, int]) -> jax.Array:
    """[src_h * src_w, D] -> [dst_h * dst_w, D] by bicubic interpolation of the 2D grid.

    jax's bicubic kernel (Keys a=-0.5) differs slightly from torch's (a=-0.75) used by
    mmpretrain; checkpoints are resized with torch at import (`import_pos_embed`), so this runtime
    path only serves inputs whose size differs from the configured one.
    """
    if tuple(src) == tuple(dst):
        return pos
    grid = pos.reshape(*src, -1).astype(jnp.float32)
    out = jax.image.resize(grid, (*dst, grid.shape[-1]), "bicubic", antialias=False)
    return out.reshape(-1, grid.shape[-1])


class ViT(nnx.Module):
    """Sapiens backbone: normalised images [B, H, W, 3] -> tokens [B, H/16, W/16, D] (float32).

    H and W are any multiples of the patch; positions are interpolated from the configured grid.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.cfg, self.dtype = cfg, dtype
        d, (gh, gw) = cfg.width, cfg.grid
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.patch_embed = layers.conv(
            3, d, cfg.patch, stride=cfg.patch, padding="VALID", dtype=dtype, **kw
        )
        init = nnx.initializers.truncated_normal(0.02)
        pos = init(rngs.params(), (gh * gw, d), param_dtype)
        self.pos_embed = nnx.Param(pos, out_sharding=(None, shd.EMBED))
        self.encoder = Encoder(
            d,
            cfg.depth,
            cfg.heads,
            d * cfg.mlp_ratio,
            eps=cfg.eps,
            act=gelu_exact,
            remat=cfg.remat,
            dtype=dtype,
            **kw,
        )
        self.norm = layers.layer_norm(d, eps=cfg.eps, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = shd.constrain(x, shd.BATCH, shd.HEIGHT, shd.WIDTH, shd.CHANNELS)
        t = self.patch_embed(x)  # [B, h, w, D] in the compute dtype
        b, h, w, d = t.shape
        pos = resize_pos_embed(self.pos_embed[...], self.cfg.grid, (h, w))
        t = t.reshape(b, h * w, d).astype(jnp.float32) + pos[None].astype(jnp.float32)
        t = self.norm(self.encoder(shd.constrain(t, shd.BATCH, shd.LENGTH, shd.EMBED)))
        return t.reshape(b, h, w, d)


def normalize(images: jax.Array) -> jax.Array:
    """Images in [0, 1], [..., 3] -> Sapiens-normalised values (mean/std on the 0..255 scale)."""
    mean = jnp.asarray(SAPIENS_MEAN, jnp.float32) / 255.0
    std = jnp.asarray(SAPIENS_STD, jnp.float32) / 255.0
    return (images.astype(jnp.float32) - mean) / std


class DensePredictor(nnx.Module):
    """Backbone + UV / vertex / normal / mask heads (FiCA Sec. 2.1).

    `DensePredictor(VARIANTS["1b"], rngs=nnx.Rngs(0), dtype=jnp.bfloat16)`; change the input size
    with `dataclasses.replace(VARIANTS[name], image_size=(H, W), remat="full")`.

    images [B, H, W, 3] in [0, 1] (normalised inside) -> dict of float32 maps at full resolution
    (with the default `final_upsample=2`): uv [B,H,W,2], vtx [B,H,W,3], nrm [B,H,W,3] (not unit
    length), mask_logits [B,H,W,1], and pooled [B, D] (mean of the final tokens); with
    `cfg.pose_head` also rot6d [B, 6], cam [B, 3] and expression [B, E] (`PoseHead`); with
    `cfg.landmarks` = L also kpts [B, L, 2], and the expression comes from them (`LandmarkNet`).
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.cfg = cfg
        self.backbone = ViT(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        kw = dict(
            channels=cfg.head_channels,
            convs=cfg.head_convs,
            final_upsample=cfg.final_upsample,
            pixel_channels=cfg.pixel_branch,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.pixels = (
            PixelBranch(cfg.pixel_branch, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            if cfg.pixel_branch else None
        )  # fmt: skip
        self.uv = DenseHead(cfg.width, HEADS["uv"], **kw)
        self.vtx = DenseHead(cfg.width, HEADS["vtx"], **kw)
        self.nrm = DenseHead(cfg.width, HEADS["nrm"], **kw)
        self.mask_logits = DenseHead(cfg.width, HEADS["mask_logits"], **kw)
        # with landmarks, the expression is read from them, not from the pose head
        pose_expr = 0 if cfg.landmarks else cfg.expression_dim
        self.pose = (
            PoseHead(cfg.width, pose_expr, hidden=cfg.pose_hidden, rngs=rngs,
                     dtype=dtype, param_dtype=param_dtype)
            if cfg.pose_head else None
        )  # fmt: skip
        self.landmarks = (
            LandmarkNet(cfg.landmarks, cfg.expression_dim, rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype)
            if cfg.landmarks else None
        )  # fmt: skip

    def head(self, name: str) -> DenseHead:
        if name not in HEADS:
            raise UserError(f"unknown dense head {name!r}; expected one of {sorted(HEADS)}")
        return getattr(self, name)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = normalize(images)
        feats = self.backbone(x)  # [B, h, w, D]
        pix = self.pixels(x) if self.pixels is not None else None
        out = {name: self.head(name)(feats, pix) for name in HEADS}
        out["pooled"] = jnp.mean(feats, axis=(1, 2))
        if self.pose is not None:
            out.update(self.pose(feats))
        if self.landmarks is not None:
            out.update(self.landmarks(x))  # kpts [B, L, 2] and, with E > 0, expression
        return out


# ----------------------------------------------------------------------------- Sapiens import
_BLOCK_RENAMES = {
    "ln1": ("ln1",),
    "ln2": ("ln2",),
    "attn.proj": ("attn", "out"),
    "ffn.layers.0.0": ("mlp", "fc1"),
    "ffn.layers.1": ("mlp", "fc2"),
}


def torch_leaf(module_path: tuple, kind: str, arr: np.ndarray) -> tuple[tuple, np.ndarray]:
    """torch `weight`/`bias` of a Linear / LayerNorm / Conv -> (nnx path, array in our layout)."""
    if kind == "bias":
        return (*module_path, "bias"), arr
    if arr.ndim == 1:  # LayerNorm weight
        return (*module_path, "scale"), arr
    if arr.ndim == 2:
        return (*module_path, "kernel"), weights.linear_kernel(arr)
    return (*module_path, "kernel"), weights.conv_kernel(arr)


def import_pos_embed(arr: np.ndarray, cfg: ViTConfig, name: str) -> np.ndarray:
    """mmpretrain pos_embed [1, N (+1 class slot), D] -> our [gh * gw, D] (resized with torch's
    bicubic exactly as mmpretrain's `resize_pos_embed`)."""
    import torch

    gh, gw = cfg.grid
    pos = arr.reshape(-1, arr.shape[-1])
    n = pos.shape[0]
    if n == gh * gw:
        return pos
    if n % 2 == 1 or n == gh * gw + 1:  # a class-token slot Sapiens does not use
        pos, n = pos[1:], n - 1
    if n == gh * gw:
        return pos
    side = int(round(n**0.5))
    if side * side != n:
        raise UserError(
            f"{name} has {n} positions, neither the {gh}x{gw} grid of image size "
            f"{cfg.image_size} nor a square grid; set image_size to the checkpoint's size"
        )
    grid = torch.from_numpy(pos.reshape(1, side, side, -1).transpose(0, 3, 1, 2).copy())
    out = torch.nn.functional.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    return out[0].permute(1, 2, 0).reshape(gh * gw, -1).numpy()


def sapiens_backbone_to_nnx(
    state_dict: Mapping[str, np.ndarray], cfg: ViTConfig, prefix: str = "backbone."
) -> tuple[dict[tuple, np.ndarray], list[str]]:
    """Sapiens/mmpretrain VisionTransformer keys -> ({ViT nnx path: array}, unmapped keys).

    `patch_embed.projection`, `pos_embed`, `layers.{i}.ln1|attn.qkv|attn.proj|ln2|ffn.layers.0.0|
    ffn.layers.1`, final `ln1`. The fused qkv [3D, D] is split into our q, k, v. A `cls_token`
    (pretraining checkpoints) is dropped, as mmpretrain does with `with_cls_token=False`.
    """
    flat, per_layer, unmapped = {}, {}, []
    for key, arr in state_dict.items():
        if not key.startswith(prefix):
            continue
        k, arr = key[len(prefix) :], np.asarray(arr)
        if k == "cls_token":
            continue
        if k == "pos_embed":
            flat[("pos_embed",)] = import_pos_embed(arr, cfg, key)
        elif k.startswith("patch_embed.projection."):
            path, a = torch_leaf(("patch_embed",), k.rsplit(".", 1)[1], arr)
            flat[path] = a
        elif k in ("ln1.weight", "ln1.bias"):
            path, a = torch_leaf(("norm",), k.rsplit(".", 1)[1], arr)
            flat[path] = a
        elif m := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", k):
            i, mod, kind = int(m[1]), m[2], m[3]
            block = ("encoder", "blocks")
            if mod == "attn.qkv":
                for name, part in zip("qkv", np.split(arr, 3, axis=0), strict=True):
                    path, a = torch_leaf((*block, "attn", name), kind, part)
                    per_layer[(path, i)] = a
            elif mod in _BLOCK_RENAMES:
                path, a = torch_leaf((*block, *_BLOCK_RENAMES[mod]), kind, arr)
                per_layer[(path, i)] = a
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    stacked, problems = weights.stack_layers(per_layer, cfg.depth)
    return flat | stacked, unmapped + problems


def sapiens_head_to_nnx(
    state_dict: Mapping[str, np.ndarray], prefix: str = "decode_head."
) -> tuple[dict[tuple, np.ndarray], list[str]]:
    """mmseg `VitHead` keys -> ({DenseHead nnx path: array}, unmapped keys).

    `deconv_layers.{3i}.weight` (ConvTranspose, no bias), `conv_layers.{3i}.weight|bias`,
    `conv_seg.weight|bias`; the InstanceNorms in between have no parameters.
    """
    out, unmapped = {}, []
    for key, arr in state_dict.items():
        if not key.startswith(prefix):
            continue
        k, arr = key[len(prefix) :], np.asarray(arr)
        m = re.fullmatch(r"(deconv_layers|conv_layers)\.(\d+)\.(weight|bias)", k)
        if m and int(m[2]) % 3 == 0:
            i = int(m[2]) // 3
            if m[1] == "deconv_layers" and m[3] == "weight":
                out[("deconvs", i, "kernel")] = weights.conv_transpose_kernel(arr)
                continue
            if m[1] == "conv_layers":
                path, a = torch_leaf(("convs", i), m[3], arr)
                out[path] = a
                continue
        if k in ("conv_seg.weight", "conv_seg.bias"):
            path, a = torch_leaf(("final",), k.rsplit(".", 1)[1], arr)
            out[path] = a
            continue
        unmapped.append(key)
    return out, unmapped


def load_sapiens(
    model: ViT | DensePredictor,
    source: str | Path | Mapping[str, np.ndarray],
    *,
    head: str | None = None,
    strict: bool = True,
) -> weights.KeyReport:
    """Loads a Sapiens checkpoint (`.pth` path or state dict) into a backbone or predictor.

    Every backbone parameter must be filled (with `strict`). For a `DensePredictor`, `head`
    names which of our heads receives the checkpoint's `decode_head` (e.g. "nrm" from the
    Sapiens normal model); `decode_head` keys are ignored when `head` is None. Keys outside
    `backbone.`/`decode_head.` (e.g. `data_preprocessor`) are reported as unexpected.
    Returns the combined key report; a strict mismatch raises a UserError carrying it. A task
    head whose `conv_seg` has other channels (e.g. 28 body-part classes into our 1-channel mask)
    shows up as shape-mismatched: pass `strict=False` to take its deconvs and keep our final conv.
    """
    what = str(source) if not isinstance(source, Mapping) else "state dict"
    sd = weights.load_state_dict(source) if not isinstance(source, Mapping) else dict(source)
    prefix = "backbone." if any(k.startswith("backbone.") for k in sd) else ""
    backbone = model.backbone if isinstance(model, DensePredictor) else model
    body = {k: v for k, v in sd.items() if not k.startswith("decode_head.")}
    arrays, unmapped = sapiens_backbone_to_nnx(body, backbone.cfg, prefix)
    if prefix:
        unmapped += [k for k in sd if not k.startswith(("backbone.", "decode_head."))]
    report = weights.assign(
        backbone,
        arrays,
        strict=strict,
        what=f"Sapiens backbone {backbone.cfg} from {what}",
        unexpected=unmapped,
    )
    if head is not None:
        if not isinstance(model, DensePredictor):
            raise UserError(
                f"head={head!r} needs a DensePredictor, not a bare {type(model).__name__}"
            )
        head_arrays, head_unmapped = sapiens_head_to_nnx(sd)
        report = report.merge(
            weights.assign(
                model.head(head),
                head_arrays,
                strict=strict,
                what=f"dense head {head!r} from the decode_head of {what}",
                unexpected=head_unmapped,
            )
        )
    return report
