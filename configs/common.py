"""Fields every stage config shares; a stage config starts from `base_config()` and fills `model`.

Launch (any stage): `fica train STAGE --config configs/STAGE.py:VARIANT --workdir DIR`.
"""

import ml_collections


def base_config(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0

    # Mesh axes sizes; -1 takes the remaining devices (see fica_jax/sharding.py).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # shards written by `fica data synth` or `fica data convert`
    c.data.batch_size = 8  # global batch (all hosts)
    c.data.workers = 0  # grain worker processes per host (0: in-process)
    c.data.shuffle_seed = 0
    c.data.augment = True

    c.model = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"  # "cosine" | "constant"
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.clip_norm = 1.0
    c.optim.ema_decay = 0.0  # 0 disables the EMA of params

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.grad_accum = 1
    c.train.param_dtype = "float32"
    c.train.compute_dtype = "float32"  # "bfloat16" on accelerators
    c.train.remat = "none"  # none, full, dots_saveable, ... (fica_jax/models/remat.py REMAT_NAMES)
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.sample_every = 0  # stage preview images (0: with every eval)
    c.train.ckpt_every = 100
    c.train.keep = 3  # newest checkpoints kept
    c.train.keep_every = 0  # also keep steps divisible by this (0: none)
    return c


def apply_schedule(
    c: ml_collections.ConfigDict,
    *,
    tiny: bool,
    batch: int,
    steps: int,
    lr: float,
    warmup_cap: int,
    log_every: tuple[int, int] = (25, 100),
    ckpt_every: tuple[int, int] = (100, 1000),
    eval_every: tuple[int, int] = (0, 0),
    bf16: bool | None = None,
    remat: str = "none",
) -> ml_collections.ConfigDict:
    """The training schedule every stage config ends with.

    Pairs are (tiny, larger variants): the tiny (CPU) variants log and checkpoint often. Warm-up
    is a tenth of the run, at most `warmup_cap` steps. Larger variants compute in bfloat16
    unless `bf16` says otherwise; `remat` is the policy (fica_jax/models/remat.py REMAT_NAMES).
    """
    pick = 0 if tiny else 1
    c.data.batch_size = batch
    c.optim.lr = lr
    c.optim.warmup_steps = min(warmup_cap, steps // 10)
    c.train.steps = steps
    c.train.log_every = log_every[pick]
    c.train.ckpt_every = ckpt_every[pick]
    c.train.eval_every = eval_every[pick]
    if (not tiny) if bf16 is None else bf16:
        c.train.compute_dtype = "bfloat16"
    c.train.remat = remat
    return c
