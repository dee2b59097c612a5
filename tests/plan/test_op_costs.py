"""HLO cost accounting that `fica plan` and the benchmarks' rooflines rest on
(`fica_jax.perf.op_costs`, `fica_jax.perf.hlo_stats`): per-op bytes and FLOPs counted by hand on
small programs, CPU and TPU HLO alike."""

import pytest

from fica_jax.perf import hlo_stats as hs
from fica_jax.perf.op_costs import op_costs


def test_op_roofline_hand_counted():
    """Per-op bytes and FLOPs of a scanned matmul + tanh, counted by hand: each of the L loop
    iterations slices one [D, D] weight out of the stacked [L, D, D] (reads the slice, not the
    stack), multiplies [B, D] x [D, D] and applies tanh, all f32; the time is the per-op max of
    FLOPs / peak and bytes / HBM bandwidth."""
    import jax
    import jax.numpy as jnp

    from fica_jax.perf.chips import CHIPS, op_roofline

    b, d, n_layers, f32 = 8, 32, 4, 4

    def f(x, w):
        return jax.lax.scan(lambda x, wi: (jnp.tanh(x @ wi), None), x, w)[0]

    x = jax.ShapeDtypeStruct((b, d), jnp.float32)
    w = jax.ShapeDtypeStruct((n_layers, d, d), jnp.float32)
    ops = {o.name: o for o in op_costs(jax.jit(f).lower(x, w).compile().as_text())}
    dot = next(o for o in ops.values() if o.kind == "matmul")
    assert dot.count == n_layers and dot.flops == 2 * b * d * d
    assert dot.bytes == f32 * (b * d + d * d + b * d)  # x and the weight slice in, x @ w out
    tanh = next(o for o in ops.values() if "tanh" in o.label)
    assert (tanh.count, tanh.bytes, tanh.flops) == (n_layers, f32 * 2 * b * d, 0)
    (ds,) = [o for o in ops.values() if o.kind == "slice-update"]
    assert ds.count == n_layers and ds.bytes == f32 * 2 * d * d + 4  # slice, result, s32 index
    assert sum(o.count * o.flops for o in ops.values()) == n_layers * 2 * b * d * d
    v5p = CHIPS["v5p"]
    want = sum(o.count * max(o.flops / v5p.peak_flops, o.bytes / v5p.hbm_bytes_per_s)
               for o in ops.values())  # fmt: skip
    assert op_roofline(list(ops.values()), v5p) == pytest.approx(want)
    assert want == pytest.approx(sum(o.count * o.bytes for o in ops.values()) / 2765e9)


def test_fusion_bytes_slice_and_in_place_update():
    """A fusion reading only a dynamic slice of its operand, through the CPU's bf16->f32
    converts, counts the slice; a dynamic-update-slice of a parameter at a fusion's root is in
    place: only the update is read and written (XLA's HloCostAnalysis convention)."""
    hlo = """HloModule m

%ds (p0: bf16[8,16], p1: s32[]) -> f32[16] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %cv = f32[8,16]{1,0} convert(%p0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %sl = f32[1,16]{1,0} dynamic-slice(%cv, %p1, %z), dynamic_slice_sizes={1,16}
  ROOT %bc = f32[16]{0} bitcast(%sl)
}

%dus (q0: bf16[8,16], q1: f32[16], q2: s32[]) -> bf16[8,16] {
  %q0 = bf16[8,16]{1,0} parameter(0)
  %c0 = f32[8,16]{1,0} convert(%q0)
  %q1 = f32[16]{0} parameter(1)
  %b1 = f32[1,16]{1,0} bitcast(%q1)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %up = f32[8,16]{1,0} dynamic-update-slice(%c0, %b1, %q2, %z)
  ROOT %c1 = bf16[8,16]{1,0} convert(%up)
}

ENTRY %main (a: bf16[8,16], i: s32[]) -> bf16[8,16] {
  %a = bf16[8,16]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %row = f32[16]{0} fusion(%a, %i), kind=kLoop, calls=%ds
  ROOT %put = bf16[8,16]{1,0} fusion(%a, %row, %i), kind=kLoop, calls=%dus
}
"""
    ops = {o.name: o for o in op_costs(hlo)}
    assert set(ops) == {"row", "put"}
    assert ops["row"].bytes == 16 * 2 + 4 + 16 * 4  # bf16 slice + index in, f32 row out
    assert ops["put"].bytes == 16 * 4 + 4 + 16 * 2  # f32 row + index in, bf16 row written
    assert ops["row"].kind == ops["put"].kind == "slice-update"


def test_op_bytes_of_a_tpu_program_count_hbm_only():
    """TPU HLO (`fica plan --topology`): a prefetch `copy-start` into VMEM (`S(1)`) reads its
    source from HBM once; a fusion whose operand already sits in VMEM reads no HBM for it; an
    `AllocateBuffer` custom-call moves nothing; a collective wrapped in `async-start` is left to
    the collective term, and `analyze` still counts it there."""
    hlo = """HloModule m

%mul (x: f32[128,128], y: f32[128,128]) -> f32[128,128] {
  %x = f32[128,128]{1,0:T(8,128)S(1)} parameter(0)
  %y = f32[128,128]{1,0:T(8,128)} parameter(1)
  ROOT %m = f32[128,128]{1,0:T(8,128)} multiply(%x, %y)
}

%sum (s0: f32[], s1: f32[]) -> f32[] {
  %s0 = f32[] parameter(0)
  %s1 = f32[] parameter(1)
  ROOT %s = f32[] add(%s0, %s1)
}

%rs (r0: f32[128,128]) -> f32[32,128] {
  %r0 = f32[128,128]{1,0:T(8,128)} parameter(0)
  ROOT %r = f32[32,128]{1,0:T(8,128)} reduce-scatter(%r0), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%sum
}

ENTRY %main (a: f32[128,128], b: f32[128,128]) -> f32[32,128] {
  %a = f32[128,128]{1,0:T(8,128)} parameter(0)
  %b = f32[128,128]{1,0:T(8,128)} parameter(1)
  %cs = (f32[128,128]{1,0:T(8,128)}, f32[128,128]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%a)
  %cd = f32[128,128]{1,0:T(8,128)S(1)} copy-done(%cs)
  %buf = f32[128,128]{1,0:T(8,128)} custom-call(), custom_call_target="AllocateBuffer"
  %f = f32[128,128]{1,0:T(8,128)} fusion(%cd, %b), kind=kLoop, calls=%mul
  %st = ((f32[128,128]{1,0:T(8,128)}), f32[32,128]{1,0:T(8,128)}) async-start(%f), calls=%rs
  ROOT %dn = f32[32,128]{1,0:T(8,128)} async-done(%st), calls=%rs
}
"""
    n = 128 * 128 * 4
    ops = {o.name: o for o in op_costs(hlo)}
    assert ops["f"].kind == "elementwise" and ops["cs"].kind == "copy-start"
    assert set(ops) == {"cs", "f"}
    assert ops["cs"].bytes == n  # HBM -> VMEM: one read
    assert ops["f"].bytes == n + n  # %b read from HBM, the product written; %cd is in VMEM
    assert hs.analyze(hlo).collective_bytes == {"reduce-scatter": 32 * 128 * 4 * 3}


def test_tpu_all_reduce_scatter_fusion_is_a_reduce_scatter():
    """The TPU compiler emits a gradient reduce-scatter as a kCustom fusion around all-reduce +
    1/n dynamic-slice: the collective term counts it as a reduce-scatter, the op list skips it."""
    hlo = """HloModule m

%sum (s0: f32[], s1: f32[]) -> f32[] {
  %s0 = f32[] parameter(0)
  %s1 = f32[] parameter(1)
  ROOT %s = f32[] add(%s0, %s1)
}

%all-reduce-scatter (g0: bf16[64,128]) -> bf16[16,128] {
  %g0 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %ar = bf16[64,128]{1,0:T(8,128)(2,1)} all-reduce(%g0), replica_groups={{0,1,2,3}}, to_apply=%sum
  %pid = u32[] partition-id()
  %z = u32[] constant(0)
  ROOT %ds = bf16[16,128]{1,0:T(8,128)(2,1)} dynamic-slice(%ar, %pid, %z), dynamic_slice_sizes={16,128}
}

ENTRY %main (g: bf16[64,128]) -> bf16[16,128] {
  %g = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %rs = bf16[16,128]{1,0:T(8,128)(2,1)} fusion(%g), kind=kCustom, calls=%all-reduce-scatter
}
"""
    assert op_costs(hlo) == []
    stats = hs.analyze(hlo, reduce_scatter=True)
    assert stats.collective_bytes == {"reduce-scatter": 16 * 128 * 2 * 3}  # (n - 1) x result


def test_fusion_bytes_follow_a_slice_into_a_nested_fusion():
    """TPU programs slice a scanned layer's weights inside a nested fusion: the outer fusion
    reads one layer of the stacked [L, K, N] operand, not all L."""
    hlo = """HloModule m

%layer (w0: bf16[28,64,128], i0: s32[]) -> bf16[64,128] {
  %w0 = bf16[28,64,128]{2,1,0} parameter(0)
  %i0 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = bf16[1,64,128]{2,1,0} dynamic-slice(%w0, %i0, %z, %z), dynamic_slice_sizes={1,64,128}
  ROOT %b = bf16[64,128]{1,0} bitcast(%ds)
}

%mm (x: bf16[8,64], w: bf16[28,64,128], i: s32[]) -> bf16[8,128] {
  %x = bf16[8,64]{1,0} parameter(0)
  %w = bf16[28,64,128]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %one = bf16[64,128]{1,0} fusion(%w, %i), kind=kLoop, calls=%layer
  ROOT %d = bf16[8,128]{1,0} dot(%x, %one), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: bf16[8,64], ws: bf16[28,64,128], k: s32[]) -> bf16[8,128] {
  %a = bf16[8,64]{1,0} parameter(0)
  %ws = bf16[28,64,128]{2,1,0} parameter(1)
  %k = s32[] parameter(2)
  ROOT %f = bf16[8,128]{1,0} fusion(%a, %ws, %k), kind=kOutput, calls=%mm
}
"""
    (op,) = op_costs(hlo)
    assert op.flops == 2 * 8 * 64 * 128
    assert op.bytes == 8 * 64 * 2 + 64 * 128 * 2 + 4 + 8 * 128 * 2  # x, ONE layer, index, out
