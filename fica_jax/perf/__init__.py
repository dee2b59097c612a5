"""What performance figures are computed from: the accelerator table (`chips.py`: peak FLOP/s,
HBM, bandwidth) and two analysers of compiled HLO: `hlo_stats.py` (a step's FLOPs and
collective bytes, loops unrolled) and `op_costs.py` (HBM bytes and FLOPs of every op, for the
roofline). The train loop's MFU and `fica plan` both read them."""
