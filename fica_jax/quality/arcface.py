"""ArcFace identity embeddings (insightface iresnet) in NNX, and ID-CSIM (docs/evaluation.md).

Deng et al., *ArcFace: Additive Angular Margin Loss for Deep Face Recognition* (CVPR 2019,
arXiv:1801.07698); reference code deepinsight/insightface
`recognition/arcface_torch/backbones/iresnet.py`. The network, in its eval mode:

    conv3x3(3, w) - BN - PReLU
    layer1..4: IBasicBlock x layers[i], planes w * (1, 2, 4, 8), the first block of each stride 2:
        BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN  (+ downsample conv1x1(stride) - BN)
    BN - flatten (torch NCHW order) - fc(8w * 7 * 7 -> D) - BatchNorm1d  ->  embedding [D]

Input: a 112 x 112 RGB face aligned by `face.align_faces`, normalised (x - 127.5) / 127.5, i.e.
2 * x01 - 1 (insightface `arcface_torch/inference.py`). Every BatchNorm is in eval mode
(running statistics, eps 1e-5). Parameter names follow insightface's `backbone.pth` key layout
1:1, so `load_arcface` assigns a checkpoint with a full missing/unexpected-key report.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fica_jax.errors import UserError
from fica_jax.models import layers, weights
from fica_jax.quality.image import require_weights


@dataclass(frozen=True)
class IResNetConfig:
    layers: tuple[int, int, int, int] = (3, 13, 30, 3)
    width: int = 64  # stem / layer1 channels; layers 2-4 have 2x, 4x, 8x
    features: int = 512  # embedding size
    image_size: int = 112  # the fc expects (image_size / 16)^2 positions


# insightface's variants (iresnet.py); "tiny" is a test-sized network with the same code path.
VARIANTS = {
    "iresnet18": IResNetConfig((2, 2, 2, 2)),
    "iresnet34": IResNetConfig((3, 4, 6, 3)),
    "iresnet50": IResNetConfig((3, 4, 14, 3)),
    "iresnet100": IResNetConfig((3, 13, 30, 3)),
    "tiny": IResNetConfig((1, 1, 1, 1), width=8, features=32),
}


class BatchNorm(nnx.Module):
    """Eval-mode BatchNorm over the last axis with torch's names. The running statistics are
    Params so that a checkpoint assigns 1:1 (this network is never trained here)."""

    def __init__(self, c: int, eps: float = 1e-5):
        self.weight = nnx.Param(jnp.ones((c,)))
        self.bias = nnx.Param(jnp.zeros((c,)))
        self.running_mean = nnx.Param(jnp.zeros((c,)))
        self.running_var = nnx.Param(jnp.ones((c,)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(self.running_var[...] + self.eps) * self.weight[...]
        return (x - self.running_mean[...]) * inv + self.bias[...]


class PReLU(nnx.Module):
    def __init__(self, c: int):
        self.weight = nnx.Param(jnp.full((c,), 0.25))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.where(x >= 0, x, self.weight[...] * x)


class IBasicBlock(nnx.Module):
    def __init__(self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        self.bn1 = BatchNorm(cin)
        self.conv1 = layers.conv(cin, planes, 3, padding=1, use_bias=False, rngs=rngs)
        self.bn2 = BatchNorm(planes)
        self.prelu = PReLU(planes)
        self.conv2 = layers.conv(planes, planes, 3, stride=stride, padding=1, use_bias=False,
                                 rngs=rngs)  # fmt: skip
        self.bn3 = BatchNorm(planes)
        down = stride != 1 or cin != planes
        conv = lambda: layers.conv(cin, planes, 1, stride=stride, padding=0, use_bias=False,
                                   rngs=rngs)  # fmt: skip
        self.downsample = nnx.List([conv(), BatchNorm(planes)]) if down else None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.downsample is not None:
            x = self.downsample[1](self.downsample[0](x))
        return out + x


class IResNet(nnx.Module):
    """[N, 112, 112, 3] images normalised to [-1, 1] -> embeddings [N, features]."""

    def __init__(self, cfg: IResNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        w = cfg.width
        self.conv1 = layers.conv(3, w, 3, padding=1, use_bias=False, rngs=rngs)
        self.bn1 = BatchNorm(w)
        self.prelu = PReLU(w)
        cin = w
        for i, n in enumerate(cfg.layers):
            planes = w * 2**i
            blocks = [IBasicBlock(cin if j == 0 else planes, planes, 2 if j == 0 else 1,
                                  rngs=rngs) for j in range(n)]  # fmt: skip
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
            cin = planes
        self.bn2 = BatchNorm(cin)
        side = cfg.image_size // 16
        self.fc = layers.linear(cin * side * side, cfg.features, (None, None), rngs=rngs)
        self.features = BatchNorm(cfg.features)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.prelu(self.bn1(self.conv1(x)))
        for i in range(4):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x)
        x = self.bn2(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch.flatten of NCHW
        return self.features(self.fc(x))


# ----------------------------------------------------------------------------- weights
def config_from_state_dict(sd: dict[str, np.ndarray], image_size: int = 112) -> IResNetConfig:
    """The iresnet config a `backbone.pth` state dict describes (block counts, width, D)."""
    try:
        counts = [
            1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k)))
            for i in range(1, 5)
        ]
        width, features = sd["conv1.weight"].shape[0], sd["fc.weight"].shape[0]
    except (KeyError, ValueError):
        raise UserError(
            "state dict is not an insightface iresnet backbone (expected conv1.weight, "
            "layer1..4.N.*, fc.weight keys)"
        ) from None
    return IResNetConfig(tuple(counts), int(width), int(features), image_size)


def state_dict_to_nnx(sd: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """insightface keys -> ({nnx path: array in our layout}, {nnx path: torch key})."""
    arrays, names = {}, {}
    for key, arr in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        arr = np.asarray(arr, np.float32)
        if path[-1] == "weight" and arr.ndim in (2, 4):  # conv / linear kernels
            path, arr = path[:-1] + ("kernel",), weights.to_nnx_layout(arr, arr.ndim)
        arrays[path], names[path] = arr, key
    return arrays, names


def load_arcface(path: str | os.PathLike, variant: str | None = None) -> IResNet:
    """An iresnet with the weights of insightface `backbone.pth` at `path` (config read from the
    checkpoint; `variant`, if given, must agree). Missing file or keys -> UserError."""
    require_weights("ArcFace (insightface iresnet backbone.pth)", path)
    sd = weights.load_state_dict(path)
    cfg = config_from_state_dict(sd)
    if variant is not None and VARIANTS[variant] != cfg:
        raise UserError(f"{path}: an iresnet with {cfg}, not {variant} ({VARIANTS[variant]})")
    model = nnx.eval_shape(lambda: IResNet(cfg, rngs=nnx.Rngs(0)))  # no init: all assigned
    arrays, names = state_dict_to_nnx(sd)
    weights.assign(model, arrays, names=names, what=f"ArcFace iresnet from {path}")
    return model


# ----------------------------------------------------------------------------- metric
@nnx.jit
def _embed(model: IResNet, faces: jax.Array) -> jax.Array:
    return model(2.0 * faces.astype(jnp.float32) - 1.0)  # (255 x - 127.5) / 127.5


def embed(model: IResNet, faces: jax.Array) -> jax.Array:
    """Embeddings [N, D] of aligned faces [N, 112, 112, 3] RGB in [0, 1]."""
    # full float32 convolutions (no TF32 / bf16 passes on GPU/TPU): the jit cache keys on it
    with jax.default_matmul_precision("highest"):
        return _embed(model, faces)


def id_csim(emb_a: jax.Array, emb_b: jax.Array) -> jax.Array:
    """Cosine similarity [...] of embeddings [..., D] (ID-CSIM)."""
    dot = jnp.sum(emb_a * emb_b, axis=-1)
    return dot / jnp.maximum(jnp.linalg.norm(emb_a, axis=-1) * jnp.linalg.norm(emb_b, axis=-1),
                             1e-12)  # fmt: skip
