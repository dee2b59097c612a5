"""How docs/results.md prints figures and says where each table comes from
(`benchmarks/results_page.py`)."""

from __future__ import annotations

# Keys describing how and where a file was recorded, shown above its tables in this order.
CONDITIONS = ("what", "recorded", "device", "machine", "backend", "jax_backend",
              "compiler", "jax", "jax_version", "torch", "torch_threads", "gsplat", "python",
              "dtype", "cpu_count", "cpu_cores_available", "devices", "load_avg_1m",
              "load_avg_1m_at_end", "loadavg_1m_start", "repeats", "timing", "command")  # fmt: skip
DECIMALS = {"psnr": 2, "ssim": 3, "lpips": 3, "id_csim": 3, "visible_psnr": 2, "unseen_psnr": 2}


# ------------------------------------------------------------------------------------- formatting
def num(x, digits: int | None = None) -> str:
    """A number as the page prints it: fixed decimals when given, else 4 significant digits."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if digits is not None:
            return f"{x:.{digits}f}"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
    return str(x)


def pm(value, se, digits: int | None = None, sign: bool = False) -> str:
    if value is None:
        return "-"
    text = (f"{value:+.{digits}f}" if sign else num(value, digits)) if digits else num(value)
    return text if se is None else f"{text} ± {num(se, digits)}"


def table(header: list[str], rows: list[list]) -> list[str]:
    def cell(c):
        return (c if isinstance(c, str) else num(c)).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows] + [""]


def gb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def ms(s) -> str:
    if s is None:
        return "-"
    return f"{num(s * 1e3)} ms" if s >= 1e-4 else f"{num(s * 1e6)} µs"


def heading(title: str, d: dict) -> list[str]:
    flags = [f for f in ("superseded", "partial") if f in d]
    return [f"### {title}" + (f" ({', '.join(flags)})" if flags else ""), ""]


# ------------------------------------------------------------------------------- per-file headers
def source(name: str, d: dict, link: str) -> list[str]:
    """What a table comes from: the file, whether it is superseded or partial, its conditions."""
    out = [f"From [`benchmarks/results/{name}`]({link}).", ""]
    for flag in ("superseded", "partial"):
        if flag in d:
            out += [f"**{flag.capitalize()}:** {d[flag]}", ""]
    conds = [f"{k.replace('_', ' ')}: `{d[k]}`" for k in CONDITIONS if k in d and d[k] is not None]
    return out + ([f"- {c}" for c in conds] + [""] if conds else [])


def notes(d: dict, keys=("note", "finding", "wall_note")) -> list[str]:
    return [line for k in keys if d.get(k) for line in (f"> *{k.replace('_', ' ')}:* {d[k]}", "")]
