"""Preloaded once by the fork server, so each worker forks with its heavy imports done.

It runs in the fork server process, not in the user's process: the one-thread settings for BLAS
and OpenMP are set here, before numpy (and later FAISS) load: they read them once, at load time.
"""

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_name] = "1"

import numpy  # noqa: E402
import numpy.random  # noqa: E402, F401  # a chunk's Generator: otherwise imported by every worker's first chunk

# FAISS is not preloaded: only the Laplace family searches, and importing it here (~30 ms) would
# delay every run's first worker. A worker that needs it imports it with OMP_NUM_THREADS=1 above
# already in its environment, which OpenMP reads when it loads.
import privtext.index  # noqa: E402
import privtext.mechanisms  # noqa: E402
import privtext.run.chunks  # noqa: E402
import privtext.text  # noqa: E402, F401
