"""The pod-scale training runtime shared by every stage.

stage.py        the `Stage` contract and registry          step.py       train state + sharded step
loop.py         `fica train`'s loop (resume, NaN guard)    checkpoint.py Orbax: state+data+config
optim.py        AdamW, schedule, clipping, EMA             distributed.py jax.distributed from env
metrics.py      JSONL/TensorBoard, MFU, profiler window

`fica plan` is `fica_jax/plan/`, the HLO analysers `fica_jax/perf/`, the `fica train` / `fica plan`
verbs `fica_jax/commands/train.py`.
"""
