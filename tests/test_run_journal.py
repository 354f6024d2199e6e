"""The run journal: commit lines, torn tails, locking, and refusal of a different run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from privtext.errors import OutputError, ResumeError
from privtext.run.journal import (
    Journal,
    WorkPaths,
    counters_from_dict,
    counters_to_dict,
    input_identity,
)
from privtext.text import ChunkCounters


def header(tmp_path: Path, epsilon: float = 1.0) -> dict:  # type: ignore[type-arg]
    src = tmp_path / "in.jsonl"
    if not src.exists():
        src.write_text('{"text": "the secret corpus"}\n')
    return {"format": "jsonl", "inputs": [input_identity(str(src))], "contract": {"epsilon": epsilon},
            "index": "abc", "seed_sha256": None, "output": {"compression": None}}


def test_commits_survive_and_a_torn_tail_is_dropped(tmp_path: Path) -> None:
    paths = WorkPaths.for_target(tmp_path / "out.jsonl")
    journal = Journal.create(paths.journal, header(tmp_path))
    counters = ChunkCounters(records=3, perturbed=7, doc_hist=np.array([0, 1, 0, 2]))
    for c in range(3):
        journal.commit({"i": 0, "c": c, "in": 10 * c, "line": c, "out": 5 * c, "n": counters_to_dict(counters)})
    journal.close()
    with open(paths.journal, "a") as fh:
        fh.write('{"i": 0, "c": 3, "in"')  # the kill came mid-line
    again = Journal.reopen(paths.journal, header(tmp_path))
    assert [e["c"] for e in again.entries] == [0, 1, 2] and again.resumes == 1
    total = again.total_counters()
    assert total.records == 9 and total.perturbed == 21 and total.doc_hist.tolist() == [0, 3, 0, 6]
    again.commit({"i": 0, "done": True, "out": 10})
    again.close()
    lines = paths.journal.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and "secret" not in paths.journal.read_text()


def test_a_different_run_is_refused(tmp_path: Path) -> None:
    paths = WorkPaths.for_target(tmp_path / "out.jsonl")
    Journal.create(paths.journal, header(tmp_path)).close()
    with pytest.raises(ResumeError, match="settings differ"):
        Journal.reopen(paths.journal, header(tmp_path, epsilon=2.0))
    (tmp_path / "in.jsonl").write_text('{"text": "another corpus"}\n')
    with pytest.raises(ResumeError, match="inputs changed"):
        Journal.reopen(paths.journal, header(tmp_path))


def test_a_live_journal_is_locked(tmp_path: Path) -> None:
    paths = WorkPaths.for_target(tmp_path / "out.jsonl")
    first = Journal.create(paths.journal, header(tmp_path))
    with pytest.raises(OutputError, match="another privtext run"):
        Journal.create(paths.journal, header(tmp_path))
    first.commit({"i": 0, "done": True, "out": 0})
    first.close()
    Journal.create(paths.journal, header(tmp_path)).close()


def test_counters_round_trip() -> None:
    c = ChunkCounters(records=2, word_tokens=5, oov=1, null_values=3, doc_hist=np.array([1, 0, 4]))
    back = counters_from_dict(json.loads(json.dumps(counters_to_dict(c))))
    assert counters_to_dict(back) == counters_to_dict(c)
