"""Importing public PyTorch checkpoints into our NNX modules (docs/architecture.md §1 and §6).

The foundation encoders (CLIP, Sapiens) and the SDXL VAE ship as PyTorch weights only: Hugging
Face directories (config.json + safetensors, possibly sharded), single safetensors files, or
`.pth`/`.bin` pickles (Sapiens' mmpretrain checkpoints wrap the tensors under `state_dict`).
This module reads any of them into `{torch key: np.ndarray}` without executing pickled code, and
copies arrays into a module's parameters with shape checks and a missing/unexpected-key report.
Each model file owns its key map (torch name -> nnx path); the layout converters here are shared.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fica_jax.errors import UserError

Path_ = tuple[str | int, ...]  # an nnx parameter path, e.g. ("blocks", "attn", "q", "kernel")

_EXPECTED = (
    "a .safetensors file, a Hugging Face checkpoint directory (config.json + *.safetensors or "
    "pytorch_model.bin), or a PyTorch .pth/.bin/.pt state dict"
)


# ----------------------------------------------------------------------------- reading
def _first_line(e: Exception) -> str:
    """Library errors (torch's weights_only one spans paragraphs) cut to one line for UserError;
    for a refused pickle that is the line naming the global it wanted to load."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln]
    named = [ln for ln in lines if "Unsupported global" in ln]
    return (named or lines or [type(e).__name__])[0]


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    # numpy has no bfloat16; widen reduced-precision floats to float32 (cast later to the
    # parameter dtype anyway).
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.float()
    return t.detach().cpu().numpy()


def read_safetensors(path: str | Path, *, prefixes: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The tensors of one .safetensors file as {key: numpy array}, read one by one.

    prefixes: for a file holding several models (a full SD/SDXL checkpoint), only the keys under
    the first prefix that some key carries are read (prefix removed), and nothing else of the
    file; no prefix matching keeps every key. Floats are widened to float32 through torch when
    it is installed (numpy has no bfloat16); without torch the file is read as numpy arrays.
    """
    import safetensors

    try:
        import torch  # noqa: F401

        framework, to_numpy = "pt", _torch_to_numpy
    except ImportError:
        framework, to_numpy = "numpy", np.asarray
    try:
        with safetensors.safe_open(str(path), framework=framework) as f:
            keys = list(f.keys())
            for prefix in prefixes:
                if any(k.startswith(prefix) for k in keys):
                    keys = [k for k in keys if k.startswith(prefix)]
                    return {k[len(prefix) :]: to_numpy(f.get_tensor(k)) for k in keys}
            return {k: to_numpy(f.get_tensor(k)) for k in keys}
    except Exception as e:  # corrupt header, truncated file, ...
        raise UserError(
            f"cannot read safetensors file {path} ({_first_line(e)}); expected {_EXPECTED}"
        ) from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        # weights_only: tensors and plain containers only; a pickle asking to run code fails.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        # mmengine checkpoints whose `meta` holds other objects land here too; re-saving just
        # the tensors (from a file you trust) makes them loadable without running pickled code.
        raise UserError(
            f"cannot read PyTorch checkpoint {path} as a weights-only state dict "
            f"({_first_line(e)}); expected "
            f"{_EXPECTED} (TorchScript/.pt2 exports are not supported: use the .pth release). If "
            "the file is trusted and its metadata holds other objects, re-save its tensors: "
            "torch.save(torch.load(p, weights_only=False)['state_dict'], 'clean.pth')"
        ) from None
    # mmpretrain/mmengine checkpoints: {"meta": ..., "state_dict": {...}, "optimizer": ...}.
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise UserError(f"PyTorch checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    out = {k: _torch_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise UserError(f"PyTorch checkpoint {path} contains no tensors; expected {_EXPECTED}")
    return out


def _read_dir(path: Path) -> dict[str, np.ndarray]:
    index = sorted(path.glob("*.safetensors.index.json")) + sorted(path.glob("*.bin.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read shard index {index[0]} ({e!r})") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"checkpoint directory {path} holds no weights; expected {_EXPECTED}")
    out: dict[str, np.ndarray] = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"checkpoint shard {f} (listed in {path}) does not exist")
        out.update(read_safetensors(f) if f.suffix == ".safetensors" else _read_torch(f))
    return out


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint into {torch key: numpy array} (float tensors as float32).

    `path` is a .safetensors file, a Hugging Face checkpoint directory (sharded or not), or a
    `.pth`/`.bin`/`.pt` pickle loaded with `weights_only=True` (never running pickled code);
    mmpretrain's `{"state_dict": ...}` wrapper is removed.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist; expected {_EXPECTED}")
    if p.is_dir():
        return _read_dir(p)
    if p.suffix == ".safetensors":
        return read_safetensors(p)
    if p.suffix in (".pth", ".bin", ".pt", ".ckpt"):
        return _read_torch(p)
    raise UserError(f"checkpoint {p} has an unknown suffix {p.suffix!r}; expected {_EXPECTED}")


def read_config(path: str | Path) -> dict:
    """The `config.json` of a Hugging Face checkpoint directory (or the json file itself)."""
    p = Path(path).expanduser()
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"{f} does not exist; expected a Hugging Face config.json")
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{f} is not readable JSON ({e})") from None


# ----------------------------------------------------------------------------- layouts
def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> nnx kernel [in, out]."""
    return np.asarray(w).T


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> nnx Conv kernel [kh, kw, in, out]."""
    return np.asarray(w).transpose(2, 3, 1, 0)


def to_nnx_layout(w: np.ndarray, target_ndim: int) -> np.ndarray:
    """A torch weight in the layout of an nnx param of rank `target_ndim`, chosen by rank: conv
    [O, I, kh, kw] -> [kh, kw, I, O]; linear [O, I] -> [I, O], also from a 1x1 conv [O, I, 1, 1]
    (original LDM attention projections); vectors (biases, norm scales) unchanged."""
    w = np.asarray(w)
    if w.ndim == 4 and target_ndim == 2:
        w = w[:, :, 0, 0]
    if w.ndim == 4:
        return conv_kernel(w)
    if w.ndim == 2:
        return linear_kernel(w)
    return w


def conv_transpose_kernel(w: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d weight [in, out, kh, kw] -> nnx ConvTranspose kernel [kh, kw, in, out].

    torch's transposed conv is the adjoint of a conv, i.e. a conv of the zero-dilated input with
    the spatially flipped kernel; nnx.ConvTranspose (transpose_kernel=False) does not flip, so we
    flip here. Pair it with padding `k - 1 - p` per side (torch `padding=p`).
    """
    return np.asarray(w)[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)


# ----------------------------------------------------------------------------- assigning
@dataclasses.dataclass
class KeyReport:
    """Outcome of matching checkpoint tensors against a module's parameters."""

    missing: list[str]  # our parameters that received nothing
    unexpected: list[str]  # checkpoint keys that no parameter takes
    mismatched: list[str]  # "name: checkpoint shape -> expected shape"
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def part(name, items):
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            return f"{len(items)} {name}" + (f" [{', '.join(items[:8])}{more}]" if items else "")

        return (
            f"{self.loaded} tensors matched; {part('missing', self.missing)}; "
            f"{part('unexpected', self.unexpected)}; {part('shape-mismatched', self.mismatched)}"
        )

    def merge(self, other: KeyReport) -> KeyReport:
        return KeyReport(
            self.missing + other.missing,
            self.unexpected + other.unexpected,
            self.mismatched + other.mismatched,
            self.loaded + other.loaded,
        )

    def check(self, what: str) -> KeyReport:
        """Raises a UserError naming `what` (the checkpoint / model) unless everything matched."""
        if not self.ok:
            raise UserError(f"checkpoint does not fit {what}: {self}")
        return self


def _name(path: Path_) -> str:
    return "/".join(map(str, path))


def params_of(module: nnx.Module) -> dict[Path_, nnx.Variable]:
    """{nnx path: Param variable} of `module` (works on `nnx.eval_shape` abstract modules too)."""
    return dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def match(
    module: nnx.Module,
    arrays: Mapping[Path_, np.ndarray],
    *,
    unexpected: list[str] | None = None,
    names: Mapping[Path_, str] | None = None,
) -> tuple[dict[Path_, np.ndarray], KeyReport]:
    """Checks `{nnx path: array}` (already in our layout) against `module`'s params, assigning
    nothing: returns ({path: array} of the entries that fit, report).

    Shapes must match exactly. `unexpected` carries checkpoint keys a converter could not map, so
    they appear in the same report; `names` gives the checkpoint key of a path, so the report's
    unexpected and mismatched entries name the checkpoint's tensors (missing ones are our paths).
    Works on abstract (`nnx.eval_shape`) modules.
    """
    params, names = params_of(module), names or {}
    unexpected = list(unexpected or [])
    mismatched, bad, ok = [], set(), {}
    for path, arr in arrays.items():
        path = tuple(path)
        if path not in params:
            unexpected.append(names.get(path, _name(path)))
            continue
        arr = np.asarray(arr)
        want = tuple(params[path].shape)
        if tuple(arr.shape) != want:
            mismatched.append(f"{names.get(path, _name(path))}: {tuple(arr.shape)} -> {want}")
            bad.add(path)
            continue
        ok[path] = arr
    missing = sorted(_name(p) for p in params if p not in ok and p not in bad)
    return ok, KeyReport(missing, sorted(unexpected), mismatched, loaded=len(ok))


def assign(
    module: nnx.Module,
    arrays: Mapping[Path_, np.ndarray],
    *,
    strict: bool = True,
    what: str | None = None,
    unexpected: list[str] | None = None,
    names: Mapping[Path_, str] | None = None,
) -> KeyReport:
    """Copies `{nnx path: array}` (already in our layout) into `module`'s params, in place.

    Arrays are cast to each parameter's dtype; `match` checks them first (`unexpected`, `names`
    as there). With `strict` a missing, unexpected or mismatched entry raises a UserError naming
    `what` and nothing is assigned; otherwise the matching subset is assigned and the report
    returned.
    """
    ok, report = match(module, arrays, unexpected=unexpected, names=names)
    if strict:
        report.check(what or type(module).__name__)
    params = params_of(module)
    for path, arr in ok.items():
        params[path].set_value(jnp.asarray(arr, dtype=params[path].dtype))
    return report


def export(module: nnx.Module) -> dict[Path_, np.ndarray]:
    """{nnx path: numpy array} of `module`'s params (the inverse of `assign`, for round trips)."""
    return {p: np.asarray(v.get_value()) for p, v in params_of(module).items()}


def stack_layers(
    per_layer: Mapping[tuple[Path_, int], np.ndarray], depth: int
) -> tuple[dict[Path_, np.ndarray], list[str]]:
    """Stacks per-block arrays `{(path, block index): array}` into `{path: [depth, ...]}` for
    modules whose blocks are vmapped on a leading LAYERS axis.

    Returns (stacked, problems); a path whose blocks are incomplete is left out (so `assign`
    reports it missing) and described in `problems` ("path: blocks [..] absent" or extra ones).
    """
    by_path: dict[Path_, dict[int, np.ndarray]] = {}
    for (path, i), arr in per_layer.items():
        by_path.setdefault(tuple(path), {})[int(i)] = np.asarray(arr)
    stacked, problems = {}, []
    for path, blocks in by_path.items():
        absent = [i for i in range(depth) if i not in blocks]
        extra = sorted(i for i in blocks if not 0 <= i < depth)
        if absent or extra:
            problems.append(
                f"{_name(path)}: blocks {absent or extra} {'absent' if absent else 'extra'}"
            )
            continue
        stacked[path] = np.stack([blocks[i] for i in range(depth)])
    return stacked, problems
