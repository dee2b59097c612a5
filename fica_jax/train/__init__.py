"""The pod-scale training runtime shared by every stage.

stage.py        the `Stage` contract and registry          step.py       train state + sharded step
loop.py         `fica train`'s loop (resume, NaN guard)    checkpoint.py Orbax: state+data+config
optim.py        AdamW, schedule, clipping, EMA             remat.py      remat policies by name
metrics.py      JSONL/TensorBoard, MFU, profiler window    distributed.py jax.distributed from env
plan.py         `fica plan`: AOT compile for a virtual pod hlo_stats.py  FLOPs/collectives from HLO
cli.py          `fica train` / `fica plan`
"""
