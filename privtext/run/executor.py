"""A bounded, ordered, parallel map of chunk tasks over worker processes.

Generic: each process (a worker, or the caller itself when one process is enough) builds one
processor object from a picklable factory, and the map sends it tasks and yields the results in
task order. What a chunk is and what a processor does belong to the caller.

- Workers start from a fork server (spawn where there is none), never by forking the caller: a
  forked child of a process that already ran a FAISS search can hang (faiss issue 5206).
- The fork server preloads numpy, FAISS and privtext once, with one BLAS/OpenMP thread, so a
  worker starts in milliseconds; the thread limits are set in the worker processes, never by
  editing the caller's environment.
- At most `max_in_flight` tasks are submitted and not yet consumed, so memory stays flat and a
  pipe is processed as it arrives; a feeder thread reads the next tasks while results are written.
- Workers ignore Ctrl-C, SIGTERM and SIGHUP (the caller decides and stops them), and die with
  their parent: PR_SET_PDEATHSIG on Linux plus a watchdog thread that polls the parent.
- A worker that dies or cannot start becomes a WorkerError with one line; a typed privtext error
  raised in a worker reaches the caller as itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol, TypeVar

from privtext.errors import Interrupted, PrivtextError, WorkerError
from privtext.run.outputs import pid_alive

M = TypeVar("M")

_PR_SET_PDEATHSIG = 1
WATCHDOG_SECONDS = 0.5


class Processor(Protocol):
    def process(self, task: Any) -> Any: ...


# --- inside a worker ----------------------------------------------------------------------------

_PROCESSOR: Processor | None = None
_INIT_ERROR: BaseException | None = None


def _die_with_parent(main_pid: int) -> None:
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent or not pid_alive(main_pid):
        os._exit(1)  # the parent died before the signal was armed

    def watch() -> None:
        # PDEATHSIG covers the direct parent (the fork server, which itself exits when the main
        # process goes); the watchdog also covers platforms without prctl and the main process.
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != parent or not pid_alive(main_pid):
                os._exit(1)

    threading.Thread(target=watch, name="privtext-parent-watchdog", daemon=True).start()


def _worker_init(factory: Callable[[], Processor], main_pid: int) -> None:
    global _PROCESSOR, _INIT_ERROR
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the main process decides, and stops us
    _die_with_parent(main_pid)
    from privtext.threads import limit_threads

    limit_threads(1)  # in this worker; the fork server already set the environment before numpy
    try:
        _PROCESSOR = factory()
    except BaseException as exc:  # reported by the first task, as one line, not a traceback here
        _INIT_ERROR = exc if isinstance(exc, PrivtextError) else WorkerError(
            f"a worker could not start ({type(exc).__name__}: {str(exc)[:120]}); "
            "check the index cache with privtext index")


def _worker_ping() -> int:
    if _INIT_ERROR is not None:
        raise _INIT_ERROR
    return os.getpid()


def _worker_process(task: Any) -> Any:
    if _INIT_ERROR is not None:
        raise _INIT_ERROR
    assert _PROCESSOR is not None
    return _PROCESSOR.process(task)


# --- the pool -----------------------------------------------------------------------------------


def mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where available (preloading privtext's heavy imports), else spawn. The fork
    server is started with SIGINT ignored, so Ctrl-C in a terminal reaches only the main process."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["privtext.run._boot"])
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    return ctx


# --- signals ---------------------------------------------------------------------------------

_held = 0  # > 0 while a critical section runs: signals_as_interrupts then defers its signal
_pending: list[int] = []


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Defers Ctrl-C/SIGTERM/SIGHUP (as handled by signals_as_interrupts) to the end of the block.

    A process-directed signal is delivered to whichever thread does not block it, and Python
    runs its handler in the main thread at the next bytecode: masking the main thread is not
    enough. The handler itself checks this counter instead."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if _held == 0 and _pending:
            raise Interrupted(_pending.pop())


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP stop a run exactly like Ctrl-C (workers stopped, temporary files
    removed), raising Interrupted so the CLI exits 143 / 129 / 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if fired:  # a second signal while cleaning up: let the cleanup finish
            return
        if _held:
            if not _pending:
                _pending.append(signum)
            return
        fired.append(signum)
        raise Interrupted(signum)

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)
        _pending.clear()


class _Done:
    pass


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class ChunkExecutor:
    """map(items) over `workers` processes (or this one), results in order.

    `factory` builds the per-process processor (picklable: a module-level function or a
    functools.partial of one). With workers <= 1 the caller's own processor `local` (or one built
    by the factory) runs the tasks: one chunk does not pay for starting processes."""

    def __init__(self, factory: Callable[[], Processor], workers: int,
                 local: Processor | None = None, max_in_flight: int | None = None):
        self.factory = factory
        self.workers = max(1, workers)
        self.max_in_flight = max_in_flight or 2 * self.workers
        self._local = local
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        self._stop = threading.Event()  # tells every feeder thread to stop submitting
        self._feeders: list[threading.Thread] = []

    def start(self) -> ChunkExecutor:
        """Starts the workers now (they boot while the caller opens its input)."""
        if self.workers > 1 and self._pool is None:
            # A signal between a worker's start and its entry in the pool's process table would
            # leave a worker that close() cannot see: hold signals until every worker is listed.
            ctx = mp_context()  # the fork server starts outside the block: it must not inherit it
            with signals_held():
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                                 initializer=_worker_init,
                                                 initargs=(self.factory, os.getpid()))
                self._pings = [self._pool.submit(_worker_ping) for _ in range(self.workers)]
        elif self.workers <= 1 and self._local is None:
            self._local = self.factory()
        return self

    def __enter__(self) -> ChunkExecutor:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(interrupted=exc_type is not None)

    def worker_pids(self) -> list[int]:
        if self._pool is None:
            return []
        return [p.pid for p in getattr(self._pool, "_processes", {}).values() if p.pid]

    def map(self, items: Iterable[tuple[M, Any]]) -> Iterator[tuple[M, Any]]:
        """(meta, task) pairs in; (meta, result) pairs out in the same order. Only the task
        travels to a worker; `meta` stays with the caller."""
        self.start()
        if self._pool is None:
            processor = self._local
            assert processor is not None
            return ((meta, processor.process(task)) for meta, task in items)
        return self._parallel(items)

    def _parallel(self, items: Iterable[tuple[M, Any]]) -> Iterator[tuple[M, Any]]:
        pool = self._pool
        assert pool is not None
        pending: queue.Queue[tuple[M, Future[Any]] | _Done | _Failed] = queue.Queue(self.max_in_flight)
        stop = threading.Event()
        closing = self._stop

        def put(item: Any) -> None:
            while not (stop.is_set() or closing.is_set()):
                try:
                    pending.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def feed() -> None:
            try:
                for meta, task in items:
                    if stop.is_set() or closing.is_set():
                        return
                    put((meta, pool.submit(_worker_process, task)))
                put(_Done())
            except BaseException as exc:  # surfaced in the consuming thread
                put(_Failed(exc))

        feeder = threading.Thread(target=feed, name="privtext-reader", daemon=True)
        self._feeders.append(feeder)
        feeder.start()
        try:
            while True:
                item = pending.get()
                if isinstance(item, _Done):
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                meta, future = item
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise self._broken() from None
                yield meta, result
        finally:
            stop.set()

    def _broken(self) -> WorkerError:
        codes = [p.exitcode for p in getattr(self._pool, "_processes", {}).values()
                 if p.exitcode not in (None, 0)]
        how = ""
        if codes:
            code = codes[0]
            if code < 0:
                name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
                how = f" (killed by {name}" + (", perhaps by the out-of-memory killer)"
                                              if -code == signal.SIGKILL else ")")
            else:
                how = f" (exit code {code})"
        return WorkerError(f"a worker process died{how}; rerun with fewer --workers or a smaller "
                           "--chunk-size (add --resume to continue where it stopped)")

    def close(self, interrupted: bool = False) -> None:
        """Stops the workers: after the last task, or at once on an error or a signal."""
        if self._closed:
            return
        self._closed = True
        pool = self._pool
        if pool is None:
            return
        if not interrupted:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        # Do not wait for chunks in flight: kill the workers now (they ignore SIGTERM). First stop
        # the feeders, whose next submit could start one more worker after the kill (a worker
        # that then fails to start once this process is gone, with a traceback on stderr). The
        # pool has no public way to kill its workers, hence its process table.
        self._stop.set()
        for feeder in self._feeders:
            feeder.join(timeout=2)
        table = getattr(pool, "_processes", None) or {}
        pool.shutdown(wait=False, cancel_futures=True)  # (it drops the process table)
        killed: dict[int, Any] = {}
        for _ in range(2):  # again, for a worker a last submit started meanwhile
            for pid, process in list(table.items()):
                if pid not in killed:
                    with contextlib.suppress(Exception):
                        process.kill()
                    killed[pid] = process
        for process in killed.values():
            with contextlib.suppress(Exception):
                process.join(timeout=10)
