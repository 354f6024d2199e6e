"""The executor with real worker processes: order, typed errors, start failures, thread limits."""

from __future__ import annotations

import os
import signal
import time
from functools import partial

import pytest

from privtext.errors import InputFormatError, WorkerError
from privtext.run.executor import ChunkExecutor


class Echo:
    """Answers (task, pid); tasks that say so sleep, fail or kill their worker."""

    def process(self, task: tuple[int, str]) -> tuple[int, int]:
        n, action = task
        if action == "slow":
            time.sleep(0.3)
        elif action == "fail":
            raise InputFormatError(f"chunk {n} is bad")
        elif action == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        return n, os.getpid()


class Threads:
    def process(self, task: int) -> tuple[int, str | None]:
        import faiss

        return faiss.omp_get_max_threads(), os.environ.get("OMP_NUM_THREADS")


def make_echo() -> Echo:
    return Echo()


def make_threads() -> Threads:
    return Threads()


def broken_factory(kind: str) -> Echo:
    if kind == "typed":
        from privtext.errors import IndexCacheError

        raise IndexCacheError("index cache file vectors.npy is missing; rebuild it with privtext index --force")
    raise RuntimeError("boom")


def test_results_come_back_in_order_from_several_workers() -> None:
    tasks = [(i, "slow" if i % 3 == 0 else "") for i in range(12)]
    with ChunkExecutor(make_echo, workers=2) as ex:
        results = list(ex.map((t[0], t) for t in tasks))
    assert [meta for meta, _ in results] == list(range(12))
    assert [r[0] for _, r in results] == list(range(12))
    pids = {r[1] for _, r in results}
    assert os.getpid() not in pids and len(pids) == 2


def test_one_worker_runs_in_this_process() -> None:
    with ChunkExecutor(make_echo, workers=1) as ex:
        assert {r[1] for _, r in ex.map([(0, (0, "")), (1, (1, ""))])} == {os.getpid()}
        assert ex.worker_pids() == []


def test_a_typed_error_in_a_worker_arrives_as_itself() -> None:
    with pytest.raises(InputFormatError, match="chunk 3 is bad"), ChunkExecutor(make_echo, workers=2) as ex:
        list(ex.map((i, (i, "fail" if i == 3 else "")) for i in range(8)))


@pytest.mark.parametrize(("kind", "error", "needle"), [
    ("typed", Exception, "privtext index --force"),
    ("other", WorkerError, "a worker could not start (RuntimeError: boom)"),
])
def test_a_worker_that_cannot_start_is_one_error(kind: str, error: type, needle: str) -> None:
    with pytest.raises(error) as info, ChunkExecutor(partial(broken_factory, kind), workers=2) as ex:
        list(ex.map((i, (i, "")) for i in range(4)))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_dead_worker_is_a_worker_error() -> None:
    with pytest.raises(WorkerError, match="killed by SIGKILL"), ChunkExecutor(make_echo, workers=2) as ex:
        list(ex.map((i, (i, "die" if i == 2 else "slow")) for i in range(6)))


def test_thread_limits_are_set_in_the_workers_not_in_this_process() -> None:
    import faiss

    before_env = os.environ.get("OMP_NUM_THREADS")
    before_threads = faiss.omp_get_max_threads()
    with ChunkExecutor(make_threads, workers=2) as ex:
        answers = [r for _, r in ex.map((i, i) for i in range(4))]
    assert all(a == (1, "1") for a in answers)
    assert os.environ.get("OMP_NUM_THREADS") == before_env
    assert faiss.omp_get_max_threads() == before_threads


def test_close_on_interrupt_leaves_no_worker() -> None:
    ex = ChunkExecutor(make_echo, workers=2).start()
    results = ex.map((i, (i, "slow")) for i in range(100))
    next(results)
    pids = ex.worker_pids()
    assert len(pids) == 2
    ex.close(interrupted=True)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
