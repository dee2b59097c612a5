"""Importing diffusers / original LDM AutoencoderKL checkpoints into `fica_jax.models.vae`.

`from_pretrained(path)` reads a local diffusers AutoencoderKL directory (config.json +
diffusion_pytorch_model*.safetensors, or a pipeline directory with a vae/ folder) or a single
.safetensors file: a diffusers one, stabilityai's original-format `sdxl_vae.safetensors`, or a
full SD/SDXL checkpoint whose `first_stage_model.` tensors are the VAE. Nothing is downloaded.

This file owns the key map (diffusers name -> nnx path, original CompVis/SGM name -> diffusers
name); reading, layout conversion and the strict shape-checked assignment are
`fica_jax.models.weights`'.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fica_jax.errors import UserError
from fica_jax.models import weights
from fica_jax.models.remat import Remat
from fica_jax.models.vae import VARIANTS, AutoencoderKL, VAEConfig
from fica_jax.models.weights import KeyReport

# A diffusers AutoencoderKL checkpoint is a directory with config.json and this safetensors file
# (the `vae/` folder of an SDXL pipeline, or stabilityai/sdxl-vae itself).
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

# diffusers name fragments -> ours. The `query/key/value/proj_attn` names are those of diffusers
# < 0.14, which some hub VAE checkpoints still carry (diffusers renames them on load, as we do).
_RENAMES: tuple[tuple[str, str], ...] = (
    (".downsamplers.0.", ".resample."),
    (".upsamplers.0.", ".resample."),
    (".attentions.0.group_norm.", ".attention.norm."),
) + tuple(
    (f".attentions.0.{name}.", f".attention.attn.{ours}.")
    for names, ours in ((("to_q", "query"), "q"), (("to_k", "key"), "k"), (("to_v", "value"), "v"),
                        (("to_out.0", "proj_attn"), "out"))
    for name in names
)  # fmt: skip

# Original CompVis/SGM names (stabilityai's single-file sdxl_vae.safetensors, full SD/SDXL
# checkpoints under `first_stage_model.`) -> diffusers names, as diffusers' single-file loader
# does. LDM's decoder.up.{i} is indexed by resolution level (0 = full resolution) while diffusers'
# up_blocks are in execution order, so up.{i} is up_blocks.{n - 1 - i} (`ldm_to_diffusers_key`).
LDM_PREFIXES = ("first_stage_model.", "vae.")
_LDM_RENAMES: tuple[tuple[str, Any], ...] = (
    (
        r"^(encoder|decoder)\.mid\.block_(\d)\.",
        lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.",
    ),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
)


def is_ldm_state_dict(state_dict: Mapping[str, Any]) -> bool:
    return any(re.match(r"^(encoder\.down|decoder\.up|encoder\.mid)\.", k) for k in state_dict)


def ldm_to_diffusers_key(key: str, num_blocks: int) -> str:
    """'decoder.up.3.block.0.nin_shortcut.weight' (n=4) -> 'decoder.up_blocks.0.resnets.0.
    conv_shortcut.weight'."""
    for pattern, repl in _LDM_RENAMES:
        key = re.sub(pattern, repl, key)
    m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.(.*)$", key)
    if m:
        sub = "resnets." if m[2] == "block" else "upsamplers.0."
        key = f"decoder.up_blocks.{num_blocks - 1 - int(m[1])}.{sub}{m[3]}"
    return key


def torch_key_to_path(key: str) -> tuple[str | int, ...]:
    """'encoder.down_blocks.0.resnets.1.conv1.weight' -> our nnx path (weight -> kernel/scale
    is decided by the target's rank, so the leaf stays 'weight' here)."""
    k = key
    for old, new in _RENAMES:
        k = k.replace(old, new)
    return tuple(int(p) if p.isdigit() else p for p in k.split("."))


def _nnx_path_to_key(path: tuple) -> tuple:
    """Our parameter path with the leaf generalised to torch's 'weight'/'bias'."""
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return (*path[:-1], leaf)


def _to_nnx(
    model: AutoencoderKL, state_dict: Mapping[str, np.ndarray]
) -> tuple[dict[tuple, np.ndarray], dict[tuple, str], list[str]]:
    """Checkpoint tensors -> ({nnx path: array in our layout}, {nnx path: checkpoint key},
    checkpoint keys no parameter takes). Original-format (LDM) names are recognised."""
    params = weights.params_of(model)
    by_key = {_nnx_path_to_key(p): p for p in params}
    arrays, names, unexpected = {}, {}, []
    ldm, n = is_ldm_state_dict(state_dict), len(model.cfg.block_out_channels)
    for key in sorted(state_dict):
        tkey = torch_key_to_path(ldm_to_diffusers_key(key, n) if ldm else key)
        if tkey not in by_key:
            unexpected.append(key)
            continue
        path = by_key[tkey]
        arrays[path] = weights.to_nnx_layout(state_dict[key], len(params[path].shape))
        names[path] = key
    return arrays, names, unexpected


def match_state_dict(
    model: AutoencoderKL, state_dict: Mapping[str, np.ndarray]
) -> tuple[dict[tuple, np.ndarray], KeyReport]:
    """Maps a diffusers AutoencoderKL state dict onto `model`'s parameters without assigning.

    Returns ({nnx path: array in our layout}, report); the report names the checkpoint's own
    keys. Original-format (LDM) names are recognised. Works on abstract (`nnx.eval_shape`)
    models, and on zero-stride views (`np.broadcast_to`) for shape-only checks.
    """
    arrays, names, unexpected = _to_nnx(model, state_dict)
    return weights.match(model, arrays, unexpected=unexpected, names=names)


def load_torch_state_dict(
    model: AutoencoderKL, state_dict: Mapping[str, np.ndarray], *, strict: bool = True
) -> KeyReport:
    """Copies a diffusers AutoencoderKL state dict (numpy arrays) into `model` in place.

    Every matching tensor is assigned (cast to the parameter dtype); with `strict`, any missing,
    unexpected or shape-mismatched tensor raises a `UserError` carrying the report (and nothing
    is assigned).
    """
    arrays, names, unexpected = _to_nnx(model, state_dict)
    return weights.assign(
        model,
        arrays,
        strict=strict,
        what=f"AutoencoderKL({model.cfg})",
        unexpected=unexpected,
        names=names,
    )


def config_from_diffusers(d: Mapping[str, Any], source: str = "config.json") -> VAEConfig:
    """A diffusers AutoencoderKL `config.json` dict -> VAEConfig (refusing other architectures)."""
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise UserError(f"{source}: _class_name is {name!r}; expected 'AutoencoderKL'")
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):  # fmt: skip
        bad = [t for t in d.get(key, [want]) if t != want]
        if bad:
            raise UserError(f"{source}: {key} has {bad}; only {want!r} blocks are supported")
    if d.get("act_fn", "silu") != "silu":
        raise UserError(f"{source}: act_fn is {d['act_fn']!r}; expected 'silu'")
    try:
        return VAEConfig(
            in_channels=int(d.get("in_channels", 3)),
            out_channels=int(d.get("out_channels", 3)),
            block_out_channels=tuple(int(c) for c in d["block_out_channels"]),
            layers_per_block=int(d.get("layers_per_block", 1)),
            norm_groups=int(d.get("norm_num_groups", 32)),
            latent_channels=int(d.get("latent_channels", 4)),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=float(d.get("shift_factor") or 0.0),
            mid_block_attention=bool(d.get("mid_block_add_attention", True)),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: cannot read the AutoencoderKL config ({e!r})") from None


def _find_checkpoint(path: Path) -> tuple[Path | None, Path]:
    """(config.json or None, weights file) for a checkpoint directory or safetensors file."""
    expected = (
        f"expected a diffusers AutoencoderKL directory holding {CONFIG_NAME} and {WEIGHTS_NAME} "
        "(or a pipeline directory with a vae/ folder), or a .safetensors file"
    )
    if not path.exists():
        raise UserError(f"VAE checkpoint {path} does not exist; {expected}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"VAE checkpoint {path} is not a .safetensors file; {expected}")
        return None, path
    if not (path / CONFIG_NAME).is_file() and (path / "vae" / CONFIG_NAME).is_file():
        path = path / "vae"
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"VAE checkpoint directory {path} has no {CONFIG_NAME}; {expected}")
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        # Precision variants (`diffusion_pytorch_model.fp16.safetensors`) are fine too.
        variants = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not variants:
            bins = sorted(p.name for p in path.glob("*.bin"))
            hint = f" (found {bins}: re-save with safe_serialization=True)" if bins else ""
            raise UserError(f"VAE checkpoint directory {path} has no {WEIGHTS_NAME}{hint}")
        weights_file = variants[0]
    return path / CONFIG_NAME, weights_file


def from_pretrained(
    path: str | os.PathLike,
    *,
    cfg: VAEConfig | None = None,
    dtype=jnp.float32,
    remat: Remat = "none",
) -> AutoencoderKL:
    """Builds an AutoencoderKL from a local diffusers checkpoint (nothing is downloaded).

    path: a directory with config.json + diffusion_pytorch_model.safetensors (or a pipeline
    directory whose vae/ folder has them), or a bare .safetensors file, in which case `cfg`
    (default: the SDXL variant) gives the architecture. remat: a policy name from
    `fica_jax.models.remat` for each resnet block. Parameters are float32 on the default
    device; reshard with `jax.device_put(nnx.state(m), sharding.param_shardings(...))`.
    Raises `UserError` for a bad path or a checkpoint that does not fit the architecture.
    """
    config_file, weights_file = _find_checkpoint(Path(path))
    if cfg is None:
        if config_file is None:
            cfg = VARIANTS["sdxl"]
        else:
            cfg = config_from_diffusers(weights.read_config(config_file), str(config_file))
    cfg = dataclasses.replace(cfg, remat=remat)
    # A full SD/SDXL checkpoint: only its VAE tensors are read, prefix removed.
    state_dict = weights.read_safetensors(weights_file, prefixes=LDM_PREFIXES)
    # Build abstract shapes only: every parameter is then set from the checkpoint (strict).
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    try:
        load_torch_state_dict(model, state_dict, strict=True)
    except UserError as e:
        raise UserError(f"{weights_file}: {e}") from None
    # Every variable of the model is a checkpoint parameter; anything still abstract is a bug.
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))
    return model
