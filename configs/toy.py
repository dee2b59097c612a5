"""Toy stage: a residual MLP regressing a fixed random function (runtime tests and demos).

fica train toy --config configs/toy.py --workdir /tmp/toy
fica train toy --config configs/toy.py:wide --workdir /tmp/toy_wide --config.mesh.data=2
fica plan --config configs/toy.py --mesh data=2,fsdp=4
"""

from configs.common import apply_schedule, base_config


def get_config(arg: str = "tiny"):
    c = base_config("toy")
    sizes = {"tiny": (32, 2), "wide": (256, 4)}
    if arg not in sizes:
        raise ValueError(f"unknown toy variant {arg!r}; expected one of {sorted(sizes)}")
    width, depth = sizes[arg]
    c.model.din = 16
    c.model.dout = 8
    c.model.width = width
    c.model.depth = depth
    c.model.num_records = 4096
    c.model.num_eval_records = 64
    c.model.nan_at_step = -1  # >= 1: make that step's inputs NaN (tests the NaN guard)

    c.optim.weight_decay = 1e-4
    # both toy sizes are CPU sizes: the tiny schedule, in float32
    return apply_schedule(c, tiny=True, batch=16, steps=200, lr=3e-3, warmup_cap=5,
                          log_every=(10, 10), ckpt_every=(50, 50))  # fmt: skip
