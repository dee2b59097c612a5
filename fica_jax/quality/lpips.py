"""LPIPS v0.1 in JAX, computed as the `lpips` package computes it (docs/evaluation.md).

Zhang et al., *The Unreasonable Effectiveness of Deep Features as a Perceptual Metric*
(CVPR 2018, arXiv:1801.03924); reference code richzhang/PerceptualSimilarity, PyPI `lpips` 0.1.4
(`lpips/lpips.py` `LPIPS.forward`, `pretrained_networks.py`). For images x0, x1 in [-1, 1]:

    x  -> (x - shift) / scale                      ScalingLayer, v0.1 only
    f_l = relu outputs of the torchvision backbone  alex relu1..5; vgg16 relu1_2 .. relu5_3
    u_l = f_l / (||f_l||_channels + 1e-10)          per pixel, `normalize_tensor`
    d   = sum_l mean_hw( sum_c w_lc (u0_lc - u1_lc)^2 )   1x1 linear heads `lin{l}`, no bias

Weights are local files: the backbone from a torchvision state dict (`alexnet` / `vgg16`
`features.*` keys, e.g. torchvision's `alexnet-owt-7be5be79.pth`, `vgg16-397923af.pth`) and the
heads from the lpips wheel's `weights/v0.1/{alex,vgg}.pth`. `weights_unavailable` (metrics.py)
tells a harness to print "unavailable" instead; nothing here ever uses random weights.

Ranges: `lpips` takes [-1, 1] (the package's default, `normalize=False`) and checks it;
`lpips_01` takes [0, 1] and maps 2x - 1 itself (the package's `normalize=True`).
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.errors import UserError
from fica_jax.models import weights
from fica_jax.quality.image import require_weights

Params = dict  # {"convs": [{"kernel": [k, k, I, O], "bias": [O]}, ...], "lins": [[C_l], ...]}

# lpips ScalingLayer constants (ImageNet mean/std expressed for [-1, 1] inputs)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # lpips.normalize_tensor


def _vgg_ops():
    ops = []
    for i, (c, n) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        ops += ["M2"] * (i > 0) + [(c, 3, 1, 1)] * n
    return tuple(ops)


# torchvision `features` up to the last layer LPIPS reads: a conv (out, kernel, stride, pad) is
# always followed by a ReLU (torchvision indices conv i, relu i + 1), "Mk" is MaxPool2d(k, 2).
# The second entry: ordinals of the convs whose ReLU output is an LPIPS layer.
_ALEX = ((64, 11, 4, 2), "M3", (192, 5, 1, 2), "M3", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
NETS = {"alex": (_ALEX, (0, 1, 2, 3, 4)), "vgg": (_vgg_ops(), (1, 3, 6, 9, 12))}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


def _check_net(net: str) -> None:
    if net not in NETS:
        raise ValueError(f"LPIPS backbone {net!r}: expected one of {sorted(NETS)}")


def conv_layout(net: str) -> list[tuple[int, int, int, int, int]]:
    """[(torchvision features index, out, kernel, stride, pad)] of the backbone's convs."""
    _check_net(net)
    out, idx = [], 0
    for op in NETS[net][0]:
        if isinstance(op, str):
            idx += 1
        else:
            out.append((idx, *op))
            idx += 2
    return out


# ----------------------------------------------------------------------------- weights
def _take(sd: dict, keys: tuple[str, ...], shape: tuple, path) -> np.ndarray:
    for k in keys:
        if k in sd:
            if tuple(sd[k].shape) != tuple(shape):
                raise UserError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {shape}")
            return np.asarray(sd[k], np.float32)
    raise UserError(f"{path}: no tensor {keys[0]!r} (expected the layout of {keys[0]})")


def load_lpips(net: str, backbone_path: str | os.PathLike, heads_path: str | os.PathLike) -> Params:
    """LPIPS v0.1 parameters from a torchvision backbone state dict (`features.{i}.weight/bias`)
    and the lpips heads file (`lin{l}.model.1.weight` [1, C, 1, 1]). A missing or mismatched file
    raises a UserError naming it."""
    _check_net(net)
    require_weights(f"LPIPS v0.1 {net} backbone (torchvision {net} features.*)", backbone_path)
    require_weights(f"LPIPS v0.1 {net} heads (lpips weights/v0.1/{net}.pth)", heads_path)
    sd = weights.load_state_dict(backbone_path)
    convs, cin = [], 3
    for idx, cout, k, _, _ in conv_layout(net):
        w = _take(sd, (f"features.{idx}.weight",), (cout, cin, k, k), backbone_path)
        b = _take(sd, (f"features.{idx}.bias",), (cout,), backbone_path)
        convs.append({"kernel": jnp.asarray(weights.conv_kernel(w)), "bias": jnp.asarray(b)})
        cin = cout
    sd = weights.load_state_dict(heads_path)
    lins = []
    for i, c in enumerate(CHANNELS[net]):
        keys = (f"lin{i}.model.1.weight", f"lin{i}.model.0.weight")  # with / without dropout
        lins.append(jnp.asarray(_take(sd, keys, (1, c, 1, 1), heads_path).reshape(c)))
    return {"convs": convs, "lins": lins}


# ----------------------------------------------------------------------------- network
def features(x: jax.Array, params: Params, net: str) -> list[jax.Array]:
    """Backbone ReLU outputs [N, h_l, w_l, C_l] of ScalingLayer-ed images x [N, H, W, 3]."""
    ops, taps = NETS[net]
    out, i = [], 0
    for op in ops:
        if isinstance(op, str):  # MaxPool2d(k, stride 2), floor mode, no padding
            k = int(op[1:])
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, 2, 2, 1), "VALID")
            continue
        _, k, s, p = op
        x = jax.lax.conv_general_dilated(
            x,
            params["convs"][i]["kernel"],
            (s, s),
            ((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision="highest",
        )
        x = jax.nn.relu(x + params["convs"][i]["bias"])
        if i in taps:
            out.append(x)
        i += 1
    return out


@partial(jax.jit, static_argnames=("net",))
def _distance(x0: jax.Array, x1: jax.Array, params: Params, net: str) -> jax.Array:
    n = x0.shape[0]
    x = jnp.concatenate([x0, x1]).astype(jnp.float32)
    x = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    total = jnp.zeros((n,), jnp.float32)
    for f, w in zip(features(x, params, net), params["lins"], strict=True):
        f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + _EPS)
        d = jnp.square(f[:n] - f[n:])
        total = total + jnp.mean(jnp.einsum("NHWC,C->NHW", d, w, precision="highest"), (1, 2))
    return total


def _concrete_range(x: jax.Array) -> tuple[float, float] | None:
    if isinstance(x, jax.core.Tracer):
        return None
    return float(jnp.min(x)), float(jnp.max(x))


def lpips(
    a: jax.Array,  # [..., H, W, 3] RGB in [-1, 1]
    b: jax.Array,  # [..., H, W, 3] RGB in [-1, 1]
    params: Params,
    net: str = "alex",
    *,
    check_range: bool = True,
) -> jax.Array:
    """LPIPS v0.1 distance per image [...] of images in [-1, 1] (lpips' `normalize=False`).

    With `check_range` (concrete inputs), values outside [-1, 1] raise ValueError, and so do two
    images without a single negative value (they look like [0, 1] data: use `lpips_01`). Inside
    a caller's trace the check cannot raise: out-of-range images give NaN instead.
    """
    _check_net(net)
    if a.shape != b.shape or a.shape[-1] != 3:
        raise ValueError(f"LPIPS: images {a.shape} and {b.shape}: expected equal [..., H, W, 3]")
    lead = a.shape[:-3]
    a, b = a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])
    bad = jnp.zeros((), bool)
    if check_range:
        ra, rb = _concrete_range(a), _concrete_range(b)
        if ra is not None and rb is not None:
            lo, hi = min(ra[0], rb[0]), max(ra[1], rb[1])
            if lo < -1 - 1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"LPIPS: inputs span [{lo:.3g}, {hi:.3g}], expected [-1, 1]")
            if lo >= 0:
                raise ValueError(
                    f"LPIPS: inputs span [{lo:.3g}, {hi:.3g}] with no negative value: they look "
                    "like [0, 1] images; call lpips_01, or pass check_range=False"
                )
        else:
            bad = (jnp.min(jnp.minimum(a, b)) < -1 - 1e-3) | (jnp.max(jnp.maximum(a, b)) > 1 + 1e-3)
    d = _distance(a, b, params, net)
    return jnp.where(bad, jnp.nan, d).reshape(lead)


def lpips_01(
    a: jax.Array,  # [..., H, W, 3] RGB in [0, 1]
    b: jax.Array,  # [..., H, W, 3] RGB in [0, 1]
    params: Params,
    net: str = "alex",
) -> jax.Array:
    """LPIPS v0.1 per image [...] of images in [0, 1], mapped to [-1, 1] as 2x - 1 (lpips'
    `normalize=True`). Values outside [0, 1] raise ValueError (NaN under a trace)."""
    for x in (a, b):
        r = _concrete_range(x)
        if r is not None and (r[0] < -1e-3 or r[1] > 1 + 1e-3):
            raise ValueError(f"LPIPS: inputs span [{r[0]:.3g}, {r[1]:.3g}], expected [0, 1]")
    return lpips(2 * a - 1, 2 * b - 1, params, net, check_range=False) + jnp.where(
        (jnp.min(jnp.minimum(a, b)) < -1e-3) | (jnp.max(jnp.maximum(a, b)) > 1 + 1e-3), jnp.nan, 0
    )
