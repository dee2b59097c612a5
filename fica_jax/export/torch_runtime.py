"""A saved avatar (`fica_jax.avatar.bundle.Avatar.save`) driven and rendered with PyTorch alone.

Imports torch, safetensors, numpy and the standard library, never jax/flax (gsplat only when
rendering), so an avatar trained in JAX runs on an A100/H100 with PyTorch + gsplat:

  av = TorchAvatar.load("avatar_dir", device="cuda")
  g = av.drive(expression [B, E], view [B, 3], gaze [B, 2])   # means, quats (w, x, y, z), ...
  img, alpha, meta = av.render(viewmat, K, 512, 512, expression=e, gaze=gz)

`drive` is `Avatar.drive` (the UPM decoder of `fica_jax.models.upm`: expression-encoder mean ->
geometry and colour branches with the identity's bias maps -> Gaussians in the surfel frames,
eyeballs turned by the gaze); its per-frame body `drive_fn` has static shapes and no
data-dependent Python control flow, so `torch.compile(av.drive_fn, fullgraph=True)` traces it
whole. `render` takes the view direction from the camera as `Avatar.render` does and rasterises
with `backend=`:
- "gsplat": `gsplat.rasterization` (CUDA; pinhole, classic, not packed, 16 px tiles, the model's
  eps2d, near 0.01, far 1e10: the conventions of `fica_jax.render.rasterize`);
- "cpu": gsplat's pure-torch projection (`gsplat.cuda._torch_impl._fully_fused_projection`) +
  the front-to-back compositor below, with the rules of `fica_jax.render.composite` (alpha =
  min(0.999, o exp(-sigma)), skipped below 1/255 or for sigma < 0, a pixel ends where T would
  fall to <= 1e-4) and the tile boxes of `fica_jax.render.tiles` (a Gaussian reaches only the
  16 px tiles its opacity-tightened 3.33-sigma box touches), in fixed-size pixel x Gaussian
  chunks so memory stays bounded;
- "auto": gsplat when CUDA is available, else cpu.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from fica_jax.errors import UserError
from fica_jax.export.manifest import AVATAR_FORMAT, AVATAR_VERSION, read_arrays, read_manifest

# as fica_jax.avatar.bundle (which imports jax, so it is not imported here); tests check they agree
FORMAT, VERSION = AVATAR_FORMAT, AVATAR_VERSION
GAUSSIAN_KEYS = ("means", "quats", "scales", "opacities", "colors")
# the rasteriser's rules (fica_jax.render.composite / project / tiles)
ALPHA_MAX, ALPHA_MIN, T_MIN, EXTENT_SIGMA = 0.999, 1.0 / 255.0, 1e-4, 3.33
NEAR, FAR, TILE = 0.01, 1e10, 16
_SOFTPLUS_INV_1 = math.log(math.e - 1.0)  # softplus(x) == 1, as models/upm.py


def to_torch_layout(name: str, array: np.ndarray) -> torch.Tensor:
    """The one JAX -> torch layout conversion: conv kernels HWIO -> OIHW, dense kernels
    [in, out] -> [out, in], bias maps NHWC -> NCHW; everything else unchanged."""
    x = torch.from_numpy(np.ascontiguousarray(array))
    if name.endswith("['kernel']"):
        return (x.permute(3, 2, 0, 1) if x.ndim == 4 else x.T).contiguous()
    if name.startswith("bias/"):
        return x.permute(0, 3, 1, 2).contiguous()
    return x


def _leaky(x):
    return F.leaky_relu(x, 0.2)


class _Branch(torch.nn.Module):
    """`upm.Branch` in NCHW: MLP(condition) -> seed -> biased up-convs -> 0.1 * conv head."""

    def __init__(self, params: dict, prefix: str, seed: int, levels: int):
        super().__init__()
        p = lambda *k: params[prefix + "".join(f"[{x!r}]" for x in k)]
        lin = lambda k: self._linear(p(k, "kernel"), p(k, "bias"))
        self.fc1, self.fc2 = lin("fc1"), lin("fc2")
        self.convs = torch.nn.ModuleList(
            [self._conv(p("convs", i, "kernel"), p("convs", i, "bias")) for i in range(levels)]
        )
        self.head = self._conv(p("head", "kernel"), p("head", "bias"))
        self.seed = seed

    @staticmethod
    def _linear(w, b):
        m = torch.nn.Linear(w.shape[1], w.shape[0])
        m.weight.data, m.bias.data = w, b
        return m

    @staticmethod
    def _conv(w, b):  # 3x3 "SAME" (stride 1): symmetric padding 1
        m = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
        m.weight.data, m.bias.data = w, b
        return m

    def forward(self, cond, biases, extra=None):
        x = self.fc2(_leaky(self.fc1(cond)))
        x = _leaky(x.reshape(cond.shape[0], self.seed, self.seed, -1).permute(0, 3, 1, 2))
        for conv, bias in zip(self.convs, biases, strict=True):
            up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest x2
            x = _leaky((conv(up) + bias) * (1 / math.sqrt(2)))
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], 1)
        return 0.1 * self.head(x)


def quat_multiply(p, q):
    """Hamilton product of [..., 4] (w, x, y, z), as `render.project.quat_multiply`."""
    pw, px, py, pz = p.unbind(-1)
    qw, qx, qy, qz = q.unbind(-1)
    return torch.stack(
        [
            pw * qw - px * qx - py * qy - pz * qz,
            pw * qx + px * qw + py * qz - pz * qy,
            pw * qy - px * qz + py * qw + pz * qx,
            pw * qz + px * qy - py * qx + pz * qw,
        ],
        -1,
    )


def rotmat_to_quat(m):
    """[..., 3, 3] -> [..., 4] unit (w, x, y, z), the same formula choice (and so the same sign)
    as `render.project.rotmat_to_quat`."""
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    a, b, c = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    xy, xz, yz = (
        m[..., 0, 1] + m[..., 1, 0],
        m[..., 0, 2] + m[..., 2, 0],
        m[..., 1, 2] + m[..., 2, 1],
    )
    cands = torch.stack(
        [
            torch.stack([1 + m00 + m11 + m22, a, b, c], -1),
            torch.stack([a, 1 + m00 - m11 - m22, xy, xz], -1),
            torch.stack([b, xy, 1 - m00 + m11 - m22, yz], -1),
            torch.stack([c, xz, yz, 1 - m00 - m11 + m22], -1),
        ],
        -2,
    )
    k = torch.argmax(torch.stack([m00 + m11 + m22, m00, m11, m22], -1), -1)
    q = torch.gather(cands, -2, k[..., None, None].expand(*k.shape, 1, 4))[..., 0, :]
    return q / torch.linalg.norm(q, dim=-1, keepdim=True)


def gaze_rotation(gaze):
    """[B, 2] (yaw, pitch) -> [B, 3, 3], as `geometry.template.gaze_rotation` (R_y @ R_x)."""
    cy, sy, cp, sp = gaze[:, 0].cos(), gaze[:, 0].sin(), gaze[:, 1].cos(), gaze[:, 1].sin()
    o, z = torch.ones_like(cy), torch.zeros_like(cy)
    ry = torch.stack([cy, z, sy, z, o, z, -sy, z, cy], -1).reshape(-1, 3, 3)
    rx = torch.stack([o, z, z, z, cp, sp, z, -sp, cp], -1).reshape(-1, 3, 3)
    return ry @ rx


def view_direction(viewmat):
    """Unit vector from the head (world origin) to the camera centre, [..., 4, 4] -> [..., 3]."""
    rot, t = viewmat[..., :3, :3], viewmat[..., :3, 3]
    centre = -torch.einsum("...ji,...j->...i", rot, t)
    return centre / torch.linalg.norm(centre, dim=-1, keepdim=True).clamp_min(1e-9)


def _read_bundle(directory) -> tuple[pathlib.Path, dict, dict]:
    d, meta = read_manifest(directory, "avatar.json", FORMAT, VERSION, "Avatar.save")
    path = d / str(meta.get("arrays", ""))
    return path, meta, read_arrays(path)


class TorchAvatar:
    """One saved avatar in PyTorch. Build with `TorchAvatar.load(directory)`."""

    def __init__(self, meta: dict, arrays: dict, path, device="cpu", dtype=torch.float32):
        cfg = self.cfg = meta["config"]
        self.info, self.device, self.dtype = meta.get("info") or {}, torch.device(device), dtype
        self.eyes = bool(cfg["eye_template"])
        levels, seed = len(cfg["channels"]), cfg["seed_resolution"]
        need = [f"bias/{i}" for i in range(meta["levels"])] + ["frame", "std"]
        need += ["texture", "geometry", "mask"] + (["eye_centres", "eye_masks"] * self.eyes)
        missing = [k for k in need if k not in arrays]
        if missing:
            raise UserError(
                f"{path} lacks {missing[0]!r} ({len(missing)} arrays missing); re-save the "
                "avatar with this fica-jax (Avatar.save)"
            )
        try:
            params = {k: to_torch_layout(k, v) for k, v in arrays.items() if k.startswith("params")}
            enc = "params['expression_encoder']"
            lin = _Branch._linear
            self.expression_encoder = torch.nn.Sequential(
                *(lin(params[f"{enc}['{n}']['kernel']"], params[f"{enc}['{n}']['bias']"])
                  for n in ("fc1", "fc2", "out"))
            )  # fmt: skip
            self.geometry = _Branch(params, "params['geometry']", seed, levels)
            self.color = _Branch(params, "params['color']", seed, levels)
        except KeyError as e:
            raise UserError(f"{path} lacks decoder array {e.args[0]}") from None
        for m in (self.expression_encoder, self.geometry, self.color):
            m.to(self.device, dtype).eval().requires_grad_(False)
        t = lambda x: torch.as_tensor(np.asarray(x)).to(self.device, dtype)
        self.biases = [to_torch_layout(f"bias/{i}", arrays[f"bias/{i}"]).to(self.device, dtype)
                       for i in range(meta["levels"])]  # fmt: skip
        flat = lambda x: t(x).reshape(1, -1, x.shape[-1])  # per texel [1, R*R, k]
        self.frame, self.std = flat(arrays["frame"]), flat(arrays["std"])
        self.texture, self.geometry_map = flat(arrays["texture"]), flat(arrays["geometry"])
        self.mask = t(arrays["mask"]).reshape(1, -1)
        if self.eyes:
            self.eye_centres = t(arrays["eye_centres"]).reshape(1, 2, 3)
            self.eye_masks = t(arrays["eye_masks"]).reshape(2, -1) > 0.5  # [2, R*R]

    @classmethod
    def load(cls, directory, device="cpu", dtype=torch.float32) -> TorchAvatar:
        """Reads `directory/avatar.json` and the arrays file it names."""
        path, meta, arrays = _read_bundle(directory)
        return cls(meta, arrays, path, device, dtype)

    # ------------------------------------------------------------------ driving
    @torch.no_grad()
    def drive_fn(self, expression, view, gaze) -> dict[str, torch.Tensor]:
        """The per-frame body of `drive`: expression [B, E], view [B, 3], gaze [B, 2] ->
        per-Gaussian means [B, N, 3], quats [B, N, 4], scales [B, N, 3], opacities [B, N],
        colors [B, N, 3]. Static shapes, no data-dependent control flow (torch.compile-able)."""
        cfg, dt = self.cfg, self.dtype
        expression, view, gaze = (x.to(self.device, dt) for x in (expression, view, gaze))
        latent = self.expression_encoder[2](
            _leaky(self.expression_encoder[1](_leaky(self.expression_encoder[0](expression))))
        )[:, : cfg["latent_dim"]]
        widths = cfg["channels"]
        geo_bias = [x[:, :w] for x, w in zip(self.biases, widths, strict=True)]
        col_bias = [x[:, w:] for x, w in zip(self.biases, widths, strict=True)]
        cond = latent if self.eyes else torch.cat([latent, gaze], -1)
        raw = self.geometry(cond, geo_bias)  # [B, 11, R, R]
        view_cond = view if self.eyes else torch.cat([view, gaze], -1)
        col = self.color(view_cond, col_bias, 10.0 * raw[:, :3])
        b = expression.shape[0]
        raw = raw.permute(0, 2, 3, 1).reshape(b, -1, raw.shape[1]).float()  # [B, N, 11]
        col = col.permute(0, 2, 3, 1).reshape(b, -1, 3).float()
        frame, std, geo = self.frame.float(), self.std.float(), self.geometry_map.float()

        dq = raw[..., 3:7] + raw.new_tensor([1.0, 0.0, 0.0, 0.0])
        quats = quat_multiply(frame.expand_as(dq), dq)
        quats = quats / torch.linalg.norm(quats, dim=-1, keepdim=True).clamp_min(1e-9)
        s = std * F.softplus(raw[..., 7:10] + _SOFTPLUS_INV_1)
        scales = cfg["max_scale"] * torch.tanh(s / cfg["max_scale"])
        logit = math.log(cfg["opacity_init"] / (1 - cfg["opacity_init"]))
        opacities = torch.sigmoid(raw[..., 10] + logit) * (self.mask > 0.5)
        means = geo + cfg["offset_scale"] * raw[..., :3]
        if self.eyes:  # `upm_geometry.turn_eyes`: each eyeball turns rigidly about its centre
            rot = gaze_rotation(gaze.float())  # [B, 3, 3]
            q_rot = rotmat_to_quat(rot)[:, None, :].expand_as(quats)
            turned_q = quat_multiply(q_rot, quats)
            centres = self.eye_centres.float().expand(b, 2, 3)
            for k in range(2):
                c = centres[:, k, None, :]
                turned = c + torch.einsum("bij,bnj->bni", rot, means - c)
                inside = self.eye_masks[k][None, :, None]
                means = torch.where(inside, turned, means)
                quats = torch.where(inside, turned_q, quats)
        colors = self.texture.float() + cfg["color_scale"] * col
        return {"means": means, "quats": quats, "scales": scales, "opacities": opacities,
                "colors": colors}  # fmt: skip

    def drive(self, expression=None, view=None, gaze=None) -> dict[str, torch.Tensor]:
        """As `Avatar.drive`: expression [E] or [B, E] (None: zeros), view [3] / [B, 3] (None:
        frontal +z), gaze [2] / [B, 2] (None: straight); unbatched in -> unbatched out."""
        e_dim = self.cfg["expression_dim"]
        as_t = lambda x: x if torch.is_tensor(x) else torch.tensor(np.asarray(x))
        e = torch.zeros(e_dim) if expression is None else as_t(expression)
        batched = e.ndim == 2
        b = e.shape[0] if batched else 1
        fill = lambda x, default: as_t(default if x is None else x).float().expand(b, len(default))
        out = self.drive_fn(e.reshape(b, e_dim).float(), fill(view, (0.0, 0.0, 1.0)),
                            fill(gaze, (0.0, 0.0)))  # fmt: skip
        return out if batched else {k: v[0] for k, v in out.items()}

    # ------------------------------------------------------------------ rendering
    def render(self, viewmat, K, width: int, height: int, *, expression=None, gaze=None,
               background=None, backend: str = "auto", **raster_kwargs):  # fmt: skip
        """One frame -> (image [H, W, 3], alpha [H, W], meta), as `Avatar.render`: the view
        direction from the camera (viewmat [4, 4] world -> camera, OpenCV; K [3, 3]), eps2d
        from the model. backend: "gsplat" (CUDA), "cpu" or "auto" (module doc); the outputs
        live on the device that rendered."""
        if backend == "auto":
            backend = "gsplat" if torch.cuda.is_available() else "cpu"
        if backend not in ("gsplat", "cpu"):
            raise UserError(f"backend {backend!r} unknown; expected 'auto', 'gsplat' or 'cpu'")
        if backend == "gsplat" and not torch.cuda.is_available():
            raise UserError("backend 'gsplat' needs CUDA (torch.cuda.is_available() is False); "
                            "use backend='cpu'")  # fmt: skip
        dev = torch.device("cuda") if backend == "gsplat" else self.device
        vm = torch.as_tensor(np.asarray(viewmat, np.float32)).to(dev)
        k = torch.as_tensor(np.asarray(K, np.float32)).to(dev)
        g = self.drive(expression, view_direction(vm).to(self.device), gaze)
        g = {n: g[n].to(dev, torch.float32) for n in GAUSSIAN_KEYS}
        bg = None if background is None else torch.as_tensor(np.asarray(background, np.float32))
        opts = {"eps2d": self.cfg["eps2d"], "near_plane": NEAR, "far_plane": FAR} | raster_kwargs
        if backend == "gsplat":
            import gsplat

            img, alpha, meta = gaussian_rasterization_gsplat(g, vm, k, width, height, bg, opts,
                                                             gsplat)  # fmt: skip
        else:
            img, alpha, meta = rasterize_cpu(*(g[n] for n in GAUSSIAN_KEYS), vm, k, width,
                                             height, background=bg, **opts)  # fmt: skip
        return img, alpha, meta | {"backend": backend}


def gaussian_rasterization_gsplat(g, viewmat, K, width, height, background, opts, gsplat):
    """`gsplat.rasterization` with the JAX rasteriser's conventions (module doc)."""
    bg = None if background is None else background.to(viewmat.device)[None]
    img, alpha, meta = gsplat.rasterization(
        *(g[n] for n in GAUSSIAN_KEYS), viewmat[None], K[None], width, height,
        packed=False, tile_size=TILE, rasterize_mode="classic", render_mode="RGB",
        backgrounds=bg, **opts,
    )  # fmt: skip
    return img[0], alpha[0, ..., 0], meta


@torch.no_grad()
def rasterize_cpu(means, quats, scales, opacities, colors, viewmat, K, width: int, height: int,
                  *, eps2d: float = 0.3, near_plane: float = NEAR, far_plane: float = FAR,
                  background=None, pixel_chunk: int = 4096, gaussian_chunk: int = 256):  # fmt: skip
    """One camera, pure torch: gsplat's torch projection + front-to-back compositing with the
    rules of `fica_jax.render` (module doc) -> (image [H, W, D], alpha [H, W], meta).

    As the JAX rasteriser, the per-tile lists are sized by a count first: every 16 px tile gets
    the depth-ordered Gaussians whose tile box touches it. Tiles are composited
    `pixel_chunk // 256` at a time (those with the longest lists first) against
    `gaussian_chunk` list entries per step, each step's lists padded to a power of two: memory
    ~ tiles per step x (N + 256 x gaussian_chunk), shapes from a small fixed set, and cost
    ~ 256 x the intersections instead of pixels x Gaussians. Empty tiles cost nothing."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmat[None], K[None], width, height, eps2d=eps2d,
        near_plane=near_plane, far_plane=far_plane,
    )  # fmt: skip
    radii, means2d, depths, conics = radii[0], means2d[0], depths[0], conics[0]
    live = (radii > 0).all(-1) & (opacities >= ALPHA_MIN)
    # culled entries may hold inf/nan (depth <= 0): zero them, they join no tile anyway
    means2d = torch.where(live[:, None], means2d, 0.0)
    conics = torch.where(live[:, None], conics, 0.0)
    tw, th = -(-width // TILE), -(-height // TILE)
    boxes = _tile_boxes(means2d, radii, opacities, live, tw, th)
    counts = _tile_counts(boxes, tw, th)
    order = torch.argsort(torch.where(live, depths, torch.inf), stable=True)  # front to back
    feats = torch.cat([means2d, conics, opacities[:, None], colors], -1)[order]
    feats = F.pad(feats, (0, 0, 0, 1))  # row n: padding (opacity 0)
    tiles = max(1, pixel_chunk // TILE**2)
    acc, trans, caps = _composite_tiles(feats, boxes[:, order], counts, tiles, gaussian_chunk)
    d = colors.shape[-1]
    img = acc.reshape(th, tw, TILE, TILE, d).permute(0, 2, 1, 3, 4)
    img = img.reshape(th * TILE, tw * TILE, d)[:height, :width]
    trans = trans.reshape(th, tw, TILE, TILE).permute(0, 2, 1, 3)
    trans = trans.reshape(th * TILE, tw * TILE)[:height, :width]
    if background is not None:
        img = img + trans[..., None] * background.to(img)
    meta = {"means2d": means2d, "conics": conics, "depths": depths, "radii": radii,
            "n_isects": int(counts.sum()), "max_tile_count": int(counts.max()),
            "capacities": caps}  # fmt: skip
    return img, 1.0 - trans, meta


def _tile_boxes(means2d, radii, opacities, live, tw: int, th: int):
    """The tiles each Gaussian reaches (`tiles.tile_boxes`): its 3.33-sigma radius tightened to
    where alpha >= 1/255 -> [4, N] (x0, x1, y0, y1), half-open tile ranges, empty when culled."""
    ext = torch.sqrt(2.0 * torch.log(opacities.clamp_min(ALPHA_MIN) / ALPHA_MIN))
    r = radii.to(means2d.dtype) * torch.clamp(ext / EXTENT_SIGMA, max=1.0)[:, None]
    lo, hi = torch.floor((means2d - r) / TILE).long(), torch.ceil((means2d + r) / TILE).long()
    x0, x1 = lo[:, 0].clamp(0, tw), hi[:, 0].clamp(0, tw)
    y0, y1 = lo[:, 1].clamp(0, th), hi[:, 1].clamp(0, th)
    x1, y1 = torch.where(live, x1, x0), torch.where(live, y1, y0)  # culled: an empty box
    return torch.stack([x0, x1, y0, y1])


def _tile_counts(boxes, tw: int, th: int):
    """List length of every tile [th, tw]: a 2D difference array over the boxes [4, N]."""
    x0, x1, y0, y1 = boxes
    diff = torch.zeros((th + 1) * (tw + 1), dtype=torch.long, device=boxes.device)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        diff.index_add_(0, ys * (tw + 1) + xs, torch.full_like(xs, sign))
    return diff.reshape(th + 1, tw + 1).cumsum(0).cumsum(1)[:th, :tw]


def _composite_tiles(feats, bx, counts, tb: int, gaussian_chunk: int):
    """Every tile's list composited front to back: feats [N + 1, 6 + D] in depth order (row N
    padding), bx [4, N] their tile boxes, counts [th, tw] -> (acc [tiles, 256, D], T [tiles,
    256], the list capacity of each step). Tiles with similar list lengths share a step (longest
    first), `tb` at a time; each step's capacity is its longest list rounded up to a power of
    two, so few distinct shapes ever occur."""
    n, d, dev = feats.shape[0] - 1, feats.shape[-1] - 6, feats.device
    tw, n_tiles = counts.shape[1], counts.numel()
    by_len = torch.argsort(counts.reshape(-1), descending=True, stable=True)
    lens = counts.reshape(-1)[by_len].tolist()
    ly, lx = torch.meshgrid(torch.arange(TILE), torch.arange(TILE), indexing="ij")
    local = torch.stack([lx.reshape(-1), ly.reshape(-1)], -1).to(dev)  # row-major
    acc = torch.zeros(n_tiles, TILE**2, d, dtype=feats.dtype, device=dev)
    trans = torch.ones(n_tiles, TILE**2, dtype=feats.dtype, device=dev)
    caps = []
    for t0 in range(0, n_tiles, tb):
        if lens[t0] == 0:
            break  # the rest of the tiles is empty: background only
        t = by_len[t0 : t0 + tb, None]
        cap = 1 << (lens[t0] - 1).bit_length()
        kg = min(gaussian_chunk, cap)
        cap = -(-cap // kg) * kg
        caps.append(cap)
        tx, ty = t % tw, t // tw
        hit = (bx[0] <= tx) & (tx < bx[1]) & (bx[2] <= ty) & (ty < bx[3])  # [tb, N]
        slot = torch.where(hit, hit.cumsum(1) - 1, cap)  # its place in the tile's list
        ids = torch.arange(n, device=dev).expand(t.shape[0], n)
        lists = torch.full((t.shape[0], cap + 1), n, device=dev).scatter_(1, slot, ids)
        g = feats[lists[:, :cap]]  # [tb, cap, F] front to back
        centre = (torch.stack([tx, ty], -1) * TILE + local[None]).to(feats.dtype) + 0.5
        tr, ac = trans[t[:, 0]], acc[t[:, 0]]
        done = torch.zeros_like(tr, dtype=torch.bool)
        for j in range(0, cap, kg):
            tr, ac, done = _composite_chunk(tr, ac, done, centre, g[:, j : j + kg])
        trans[t[:, 0]], acc[t[:, 0]] = tr, ac
    return acc, trans, caps


def _composite_chunk(trans, acc, done, centre, g):
    """Tiles [B] x pixels [P] x one depth-ordered chunk g [B, k, 6 + D] of their lists:
    carries T [B, P], acc [B, P, D], done [B, P] (`composite._chunk`'s rules)."""
    dx = g[:, None, :, 0] - centre[..., 0, None]  # [B, P, k]
    dy = g[:, None, :, 1] - centre[..., 1, None]
    a, b, c, o = (g[:, None, :, i] for i in (2, 3, 4, 5))
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = torch.clamp(o * torch.exp(-sigma.clamp_min(0.0)), max=ALPHA_MAX)
    used = (sigma >= 0.0) & (alpha >= ALPHA_MIN)
    one_minus = 1.0 - torch.where(used, alpha, 0.0)
    t_incl = trans[..., None] * torch.cumprod(one_minus, -1)
    t_excl = trans[..., None] * torch.cumprod(F.pad(one_minus[..., :-1], (1, 0), value=1.0), -1)
    below = used & (t_incl <= T_MIN)
    keep = used & ~below & ~done[..., None]
    acc = acc + torch.where(keep, alpha * t_excl, 0.0) @ g[..., 6:]
    trans = trans * torch.where(keep, one_minus, 1.0).prod(-1)
    return trans, acc, done | below.any(-1)
