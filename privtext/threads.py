"""Thread limits for FAISS and BLAS, set inside the process that runs the mechanism.

Parallelism in privtext comes from processes (CLI workers, Spark executors, Ray actors). FAISS's
OpenMP threads spin-wait, and on a busy 2-core machine two of them ran a flat search 3x slower than
one (1.7k vs 5.7k queries/s); BLAS pools sized to all cores in every worker oversubscribe the same
way. An engine executor calls `limit_threads(1)` once, in its own process, instead of the driver
editing its own environment and hoping it is inherited.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def limit_threads(n: int = 1) -> Callable[[], None]:
    """Limit FAISS (OpenMP) and BLAS to `n` threads in this process; returns a function that
    restores the previous limits.

    BLAS is limited through threadpoolctl when it is installed (it changes pools that are already
    loaded). Without it, the environment variables are set, which only takes effect if numpy's BLAS
    has not been loaded yet in this process — so call this first thing in a fresh worker.
    """
    if n < 1:
        from privtext.errors import UsageError

        raise UsageError(f"thread limit must be at least 1, got {n}")
    restorers: list[Callable[[], None]] = []

    saved_env = {name: os.environ.get(name) for name in _BLAS_ENV}
    for name in _BLAS_ENV:
        os.environ[name] = str(n)

    def restore_env() -> None:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    restorers.append(restore_env)

    # A process that has not loaded FAISS yet gets the limit from OMP_NUM_THREADS when it does
    # (OpenMP reads it at load): importing FAISS here only to set it cost a one-record run 25 ms.
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(n)
        restorers.append(lambda: faiss.omp_set_num_threads(previous))

    if "numpy" in sys.modules:  # BLAS is loaded: the environment no longer reaches it
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            limiter = threadpool_limits(limits=n, user_api="blas")
            restorers.append(limiter.restore_original_limits)

    def restore() -> None:
        for undo in reversed(restorers):
            undo()

    return restore


def current_limits() -> dict[str, int | None]:
    """The thread counts in force in this process (for tests and diagnostics)."""
    import faiss

    limits: dict[str, int | None] = {"faiss": faiss.omp_get_max_threads(), "blas": None}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return limits
    blas = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    limits["blas"] = max(blas) if blas else None
    return limits
