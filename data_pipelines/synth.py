"""`fica data synth`: generate synthetic identities in a process pool and write shards.

Record i is `make_identity(i, cfg, seed)` (from `data_pipelines.synthetic.generator`), a pure
function of its arguments, and results are consumed in index order, so the shards are
byte-identical whatever the worker count. Workers encode (and thereby validate) records so only
bytes cross the process boundary.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from data_pipelines import schema
from data_pipelines.shards import DEFAULT_RECORDS_PER_SHARD, DatasetWriter, record_dims
from data_pipelines.workers import exit_with_parent

MakeFn = Callable[[int, Any, int], dict]


def _encode_one(job: tuple[MakeFn, int, Any, int]) -> tuple[str, dict, bytes, str]:
    make_fn, index, cfg, seed = job
    rec = make_fn(index, cfg, seed)
    schema.validate(rec, where=f"synthetic identity {index}")
    return str(rec["split"]), record_dims(rec), schema.encode(rec), str(rec["identity"])


def _results(jobs: list, workers: int) -> Iterator[tuple[str, dict, bytes, str]]:
    if workers <= 1:
        yield from map(_encode_one, jobs)
        return
    # spawn, not fork: the parent may hold jax/XLA threads, which fork does not survive.
    ctx = multiprocessing.get_context("spawn")
    # Workers exit when this process dies, even by SIGKILL (data_pipelines/workers.py).
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),)
    )
    with pool:
        try:
            yield from pool.map(_encode_one, jobs, chunksize=1)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def synthesize(
    out_dir: str | os.PathLike,
    n_identities: int,
    cfg: Any = None,
    *,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    make_fn: MakeFn | None = None,
    template: dict | None = None,
    progress: bool = True,
) -> None:
    """Writes `n_identities` synthetic identities to `out_dir` (atomic, see `DatasetWriter`).

    `make_fn`/`template` default to the synthetic generator's `make_identity` and
    `template_metadata(cfg)`; `make_fn` must be a top-level (picklable) function.
    """
    from fica_jax.errors import UserError

    if n_identities < 1:
        raise UserError(f"--identities must be >= 1, got {n_identities}")
    if make_fn is None or cfg is None or template is None:
        from data_pipelines.synthetic import generator

        cfg = generator.SynthConfig() if cfg is None else cfg
        make_fn = make_fn or generator.make_identity
        template = generator.template_metadata(cfg) if template is None else template
    workers = default_workers() if workers is None else workers
    gen_meta = {
        "name": f"{make_fn.__module__}.{make_fn.__qualname__}",
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg,
        "seed": seed,
        "identities": n_identities,
    }
    jobs = [(make_fn, i, cfg, seed) for i in range(n_identities)]
    with DatasetWriter(
        out_dir,
        overwrite=overwrite,
        records_per_shard=records_per_shard,
        generator=gen_meta,
        template=template,
    ) as writer:
        results: Iterable = _results(jobs, workers)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=n_identities, desc="synth identities", unit="id")
        for i, (split, dims, data, identity) in enumerate(results):
            writer.add_encoded(split, dims, data, identity, where=f"synthetic identity {i}")
