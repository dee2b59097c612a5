"""What performance figures are computed from: the accelerator table (`chips.py`: peak FLOP/s,
HBM, bandwidth) and the cost analysis of compiled HLO (`hlo_stats.py`: FLOPs, bytes and
collectives per op). The train loop's MFU and `fica plan` both read them."""
