"""privtext on Ray Data: `perturb_dataset(ds, column, anonymizer) -> (out_ds, report)`.

Ray Data does not tell a batch function which block it holds, so the input's blocks are first
fixed in the object store in dataset order (`to_arrow_refs`), and a dataset of block numbers is
mapped with `map_batches` over an actor pool: the actor for block b fetches it, perturbs it with
``stream=(b, 0)`` and returns it. With a seed and the same blocks, output is identical run after
run, and row order is kept.

Each actor restores the Anonymizer once (index path + manifest digest, memory-mapped), limits
FAISS/BLAS to one thread, and sends each block's counters to a small collector actor keyed by block
number: a retried block overwrites its own entry. The output is materialized before this returns,
so the report is complete and reading `out_ds` does not perturb again.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privtext.engines import executor_errors, merge_keyed, require
from privtext.errors import UsageError

if TYPE_CHECKING:
    from privtext.api import Anonymizer

STREAMS = "(block number in dataset order, 0)"
_UNPACKED: dict[str, str] = {}  # manifest digest -> local copy of a shipped index, per process


def pack_index(path: str | Path) -> dict[str, bytes]:
    """The files of an index cache (relative path -> bytes) to put in the object store."""
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


_UNPACK_PREFIX = "privtext-index-"


def unpack_index(files: dict[str, bytes], digest: str) -> str:
    """Write a shipped cache once per process into a private temporary directory.

    Ray ends its actors with a kill, so an actor cannot remove its copy itself: the directory
    is named after the process, removed at a normal exit, and any copy whose process is gone is
    removed by the next actor that unpacks one on this machine."""
    if digest in _UNPACKED:
        return _UNPACKED[digest]
    _remove_orphaned_copies()
    root = Path(tempfile.mkdtemp(prefix=f"{_UNPACK_PREFIX}{os.getpid()}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    _UNPACKED[digest] = str(root)
    return str(root)


def _remove_orphaned_copies() -> None:
    from privtext.run.outputs import pid_alive

    for old in Path(tempfile.gettempdir()).glob(f"{_UNPACK_PREFIX}*-*"):
        pid = old.name[len(_UNPACK_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


class _Collector:
    """Per-block counters, keyed by block number (a retry overwrites, never adds)."""

    def __init__(self) -> None:
        self.parts: dict[int, dict[str, Any]] = {}

    def add(self, block: int, counters: dict[str, Any]) -> None:
        self.parts[block] = counters

    def value(self) -> dict[int, dict[str, Any]]:
        return self.parts


class _BlockPerturber:
    def __init__(self, state: dict[str, Any], column: str, refs: list[Any], collector: Any,
                 shipped: list[Any] | None):
        import ray

        from privtext.threads import limit_threads

        limit_threads(1)  # Ray's actors are the parallelism, not FAISS's threads
        self.state, self.column, self.refs, self.collector = state, column, refs, collector
        self.path = None
        if shipped is not None:
            self.path = unpack_index(ray.get(shipped[0]), state["spec"]["index_digest"])

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa
        import ray

        from privtext.api import restore

        outs = []
        for block in batch.column("block").to_pylist():
            anon = restore(self.state, self.path)  # per block: a retry may recompute its stream
            out = anon.perturb_arrow(ray.get(self.refs[block]), self.column, stream=(block, 0))
            ray.get(self.collector.add.remote(block, anon.counters.to_dict()))
            outs.append(out)
        return pa.concat_tables(outs)


def init(address: str | None = None, cores: int = 2) -> Any:
    """Connect to the Ray cluster at `address` (ray://... or auto), or start a local one on
    `cores` CPUs; a no-op when Ray is already initialised."""
    ray = require("ray", "ray")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    # a batch tool's stderr carries the summary, not per-operator progress lines
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def perturb_dataset(ds: Any, column: str = "text", anonymizer: Anonymizer | None = None, *,
                    ship_index: bool = False, concurrency: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Perturb `column` of a Ray Dataset; returns (materialized output Dataset, epsilon report).

    ship_index=False: actors read the index cache at the driver's path (shared filesystem).
    ship_index=True: the cache files go through the object store once and each actor process
    writes them to a private temporary directory. `concurrency`: actors in the pool (default:
    the cluster's CPUs).
    """
    ray = require("ray", "ray")
    if anonymizer is None:
        raise UsageError("perturb_dataset needs anonymizer=privtext.Anonymizer(...)")
    if column not in ds.schema().names:
        raise UsageError(f"column {column!r} is not in the dataset; pass column= with one of: "
                         f"{', '.join(ds.schema().names)}")
    start = time.perf_counter()
    size = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    refs = ds.to_arrow_refs()
    if len(refs) < size:
        # Ray merges small files into one block; split in order (deterministic, so a seeded run
        # stays reproducible) so that every actor of the pool has a block to work on
        refs = ray.data.from_arrow_refs(refs).repartition(size).to_arrow_refs()
    shipped = [ray.put(pack_index(anonymizer.spec.index_path))] if ship_index else None
    collector = ray.remote(num_cpus=0)(_Collector).remote()
    context = ray.data.DataContext.get_current()
    previous_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # output rows in input order
    try:
        blocks = ray.data.from_items([{"block": b} for b in range(len(refs))],
                                     override_num_blocks=max(1, len(refs)))
        mapped = blocks.map_batches(
            _BlockPerturber, batch_size=1, batch_format="pyarrow", concurrency=max(1, min(size, len(refs))),
            fn_constructor_kwargs={"state": anonymizer.state(), "column": column, "refs": refs,
                                   "collector": collector, "shipped": shipped},
        )
        with executor_errors():
            out = mapped.materialize()
        parts = ray.get(collector.value.remote())
    finally:
        context.execution_options.preserve_order = previous_order
        ray.kill(collector)
    seconds = time.perf_counter() - start
    counters = merge_keyed(parts, expected=len(refs))
    run_info = {
        "seconds": seconds,
        "keyed_by": f"run key, stream {STREAMS}",
        "engine": {
            "name": "ray",
            "version": ray.__version__,
            "blocks": len(refs),
            "actors": max(1, min(size, len(refs))),
            "streams": STREAMS,
            "index": "shipped through the object store" if ship_index else "shared path",
            "counters": "collector actor keyed by block number, merged on the driver",
        },
        "input": {"column": column, "blocks": len(refs)},
    }
    from privtext.report import build_report

    return out, build_report(anonymizer.spec, counters, run_info)
