"""Sharded corpora: `privtext perturb DIR_OR_GLOB -o OUT_DIR`, one output shard per input shard.

As datatrove and dolma do, each input shard becomes one output shard with the same relative name
under OUT_DIR. One run key and one pool of workers serve every shard; shard i's randomness is
keyed as input i of the run (shards sorted by relative name), so a seeded run is reproducible and
independent of the worker count. Each shard is published atomically on its own; a completion file
`OUT_DIR/.privtext-shards.json` (counts, input identities, settings, seed commitment: no text)
records the finished ones, so `--resume` skips them and continues a killed shard from its journal.
The report covers all shards, with per-shard counts.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privtext.codecs import STDIO, format_of_name
from privtext.errors import ResumeError, UsageError
from privtext.index import EmbeddingIndex
from privtext.randomness import seed_commitment
from privtext.run.journal import counters_from_dict, counters_to_dict, input_identity
from privtext.run.outputs import write_text_atomic
from privtext.run.perturb import (
    Notify,
    PerturbOutcome,
    RunSession,
    execute,
    plan_run,
    split_name,
)
from privtext.settings import PerturbSettings
from privtext.text import ChunkCounters

MANIFEST = ".privtext-shards.json"
_GLOB_CHARS = set("*?[")


def is_sharded(inputs: list[str]) -> bool:
    """A directory or an (unexpanded) glob pattern among the inputs."""
    return any(p != STDIO and (os.path.isdir(p) or _GLOB_CHARS & set(p)) for p in inputs)


@dataclass(frozen=True)
class Shard:
    source: Path
    relative: str  # mirrored under OUT_DIR
    base: Path  # the directory it is relative to


def find_shards(inputs: list[str], settings: PerturbSettings) -> list[Shard]:
    shards: list[Shard] = []
    for spec in inputs:
        if spec == STDIO:
            raise UsageError("stdin cannot be combined with a directory or glob of shards")
        if os.path.isdir(spec):
            base = Path(spec)
            files = [p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")]
        elif _GLOB_CHARS & set(spec):
            prefix = spec[: min(spec.index(c) for c in _GLOB_CHARS if c in spec)]
            base = Path(prefix if prefix.endswith(os.sep) else os.path.dirname(prefix) or ".")
            files = [Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        else:
            base, files = Path(spec).parent, [Path(spec)]
        for path in sorted(files):
            if settings.format is None and format_of_name(str(path)) is None:
                continue  # not a corpus file (a README, a _SUCCESS marker)
            shards.append(Shard(path, str(path.relative_to(base)), base))
    if not shards:
        raise UsageError(f"no input shards found in {', '.join(inputs)}; name .jsonl, .parquet or "
                         ".txt files (optionally .gz/.zst), or pass --format")
    names = [s.relative for s in shards]
    if len(set(names)) != len(names):
        raise UsageError("two input shards have the same relative name; pass one directory or glob")
    return shards


def check_out_dir(output: str, shards: list[Shard]) -> Path:
    if output in (STDIO, "/dev/stdout"):
        raise UsageError("a directory or glob of shards needs -o OUT_DIR (one output file per shard)")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {output} is not a directory; sharded inputs write one file per shard "
                         "into a directory")
    real_out = os.path.realpath(out)
    for shard in shards:
        parent = os.path.realpath(shard.base)
        if real_out == parent or real_out.startswith(parent + os.sep):
            raise UsageError(f"-o {output} is inside the input shards' directory; a later run would "
                             "read its outputs as inputs: choose a directory outside it")
    return out


def _contract(settings: PerturbSettings) -> dict[str, Any]:
    return {"contract": settings.output_contract(), "seed_sha256": seed_commitment(settings.seed)}


def run_shards(inputs: list[str], output: str, settings: PerturbSettings, index: EmbeddingIndex, *,
               resume: bool = False, progress: bool | None = None, notify: Notify | None = None,
               on_shard: Callable[[int, Shard], None] | None = None) -> PerturbOutcome:
    say = notify or (lambda _msg: None)
    shards = find_shards(inputs, settings)
    out_dir = check_out_dir(output, shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = []
    for shard in shards:  # validate every shard before any work
        target = out_dir / shard.relative
        target.parent.mkdir(parents=True, exist_ok=True)
        plans.append(plan_run([str(shard.source)], str(target), settings, resume=resume))
    manifest_path = out_dir / MANIFEST
    done: dict[str, Any] = {}
    if resume and manifest_path.exists():
        stored = json.loads(manifest_path.read_text())
        if {k: stored.get(k) for k in ("contract", "seed_sha256")} != _contract(settings):
            raise ResumeError(f"cannot resume: {manifest_path} records other settings or another "
                              "seed; rerun with the same options, or start again without --resume")
        done = stored.get("shards", {})
    began = time.perf_counter()
    session = RunSession(index, settings)
    counters = ChunkCounters()
    per_shard: list[dict[str, Any]] = []
    resumed = bool(done)
    finished: dict[str, Any] = {}
    try:
        session.executor.start()
        for number, (shard, plan) in enumerate(zip(shards, plans)):
            identity = input_identity(str(shard.source))
            entry = done.get(shard.relative)
            published = out_dir / shard.relative
            if settings.max_rows_per_file:
                published = split_name(published, 0)
            if entry is not None and entry["input"] == identity and published.exists():
                shard_counters = counters_from_dict(entry["counts"])
                say(f"shard {number}: already finished, skipped")
            else:
                plan.input_base = number
                if on_shard is not None:
                    on_shard(number, shard)
                outcome = execute(plan, index, progress=progress, notify=notify, session=session)
                shard_counters = outcome.counters
                resumed = resumed or outcome.resumed is not None
            counters.merge(shard_counters)
            finished[shard.relative] = {"input": identity, "counts": counters_to_dict(shard_counters)}
            per_shard.append({"shard": number, "records": shard_counters.records,
                              "word_tokens": shard_counters.word_tokens,
                              "perturbed": shard_counters.perturbed, "oov": shard_counters.oov,
                              "errors": shard_counters.errors_skipped + shard_counters.errors_kept})
            write_text_atomic(str(manifest_path), json.dumps(
                {**_contract(settings), "shards": finished}, indent=1, sort_keys=True) + "\n")
        session.close()
    except BaseException:
        session.close(interrupted=True)
        raise
    outcome = PerturbOutcome(counters, time.perf_counter() - began, session.mechanism, plans[0].fmt.value, len(shards),
                             settings, session.workers,
                             {"times": 1, "seeded": settings.seed is not None} if resumed else None)
    outcome.shards = per_shard
    return outcome
