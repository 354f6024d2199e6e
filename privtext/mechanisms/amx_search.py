"""The exact nearest-word search's collection step on AMX tiles, in bf16, with a proven bound.

`collect` does what `nearest._threshold_search` does (collect every word that could be within U
of a noisy point z, U tightening as real words are measured) in a C kernel (`_amx_kernel.c`)
that multiplies bf16 tiles on the CPU's AMX unit (TDPBF16PS: 16 × 16 fp32 results from 16 × 32
bf16 products per instruction) with each query's threshold folded into the product, so a word
passes when its result is negative: one OR over a block's results finds the rare block with a
candidate, and the t × n product is never stored. The caller ranks the collected words by
numpy's float64 distance, so the answer is bit for bit the float64 scan's. Available on x86-64
Linux CPUs with AMX-BF16 (Sapphire Rapids and later) when the extension was compiled at install
(`available()`); otherwise, or with ``PRIVTEXT_AMX=off``, the caller uses the numpy path.

Why every word within U of z is collected. U is the k-th smallest float64 distance among k
distinct real words, an upper bound on the k-th nearest distance. It starts from the first
`TABLE_PROBE` words of the anchor's table row (any real words would do; with fewer than k,
U = ∞ and everything passes until k words are seen) and only shrinks.

Rounding. bf16(x) keeps 8 significant bits (round to nearest even of the float32 bits; values
below 2⁻¹²⁶ are set to 0, so no input is subnormal). Let φ_b(w) = bf16(φ(w)) and
ρ ≥ max_w ‖φ(w) − φ_b(w)‖ (measured in float64 over the vocabulary, raised by a relative
1e-6); q_b = bf16(fl32(z)) and σ = 2‖z − q_b‖ (float64, doubled against its own rounding).
N(w) = fl32(‖φ_b(w)‖²) is split exactly into three bf16 parts hi + mid + lo (8 bits each cover
float32's 24; the split is checked when the vocabulary is packed). A threshold T′ (below) is
rounded up to float32 and split the same way into t_hi + t_mid + t_lo (checked in C; were it
ever inexact, the kernel would take T′ = 10³⁰ and collect everything, still correct).

The product. A query row is (−2q_b, 1, 1, 1, −t_hi, −t_mid, −t_lo, 0, …) and a word column
(φ_b(w), hi, mid, lo, 1, 1, 1, 0, …), padded to K = 32·⌈(m + 6)/32⌉ bf16 entries (negation
and doubling are exact in bf16), so the exact value of their dot product is
N(w) − 2q_b·φ_b(w) − T′. Every product of two bf16 numbers is exact in fp32 (8 + 8 significant
bits), so the only rounding is in the sums of the K products. The hardware's order and
intermediate precision are not documented in detail; whatever they are, if each addition is
rounded to fp32 with a relative error at most 2u, u = 2⁻²⁴ (round to nearest, or toward zero),
the computed R(w) is within γ_K·Σ|terms| of the exact value, γ_K = K·2u/(1 − K·2u) (Higham,
Accuracy and Stability of Numerical Algorithms, Thm 3.1, any order); values below 2⁻¹²⁶ may be
flushed to zero, at most 2⁻¹²⁶ per operation, K·2⁻¹²⁶ in all. The product terms sum in
absolute value to at most 2‖q_b‖·‖φ_b‖ + hi + |mid| + |lo| ≤ (1 + 2⁻⁶)·(‖q_b‖ + M_b)², with
M_b² = max N (|N − hi| ≤ 2⁻⁸N, |mid| ≤ 2⁻⁸N(1 + 2⁻⁸), |lo| ≤ 2⁻¹⁶N, ‖φ_b‖² ≤ N(1 + 2⁻²³)),
and the threshold terms to at most (1 + 2⁻⁶)|T′|. With |N(w) − ‖φ_b(w)‖²| ≤ 2u·M_b² (float32
rounding of a float64 sum whose own error is far below u) and
c(w) = ‖φ_b(w)‖² − 2q_b·φ_b(w) = ‖q_b − φ_b(w)‖² − ‖q_b‖²:

    R(w) ≤ c(w) − T′ + E + γ_K·(1 + 2⁻⁶)·|T′|,
    E = γ_K·(1 + 2⁻⁶)·(‖q_b‖ + M_b)² + 2u·M_b² + K·2⁻¹²⁶.

(`products` returns the kernel's C(w) without the threshold terms, and the tests check
|C(w) − c(w)| ≤ E on the hardware, on vocabularies of mixed magnitudes.)

The threshold. A word with d(z, w) ≤ U has, by the triangle inequality,
‖q_b − φ_b(w)‖ ≤ d(z, w) + ‖z − q_b‖ + ‖φ(w) − φ_b(w)‖ ≤ U + σ + ρ, so
c(w) ≤ T₀ = (U + σ + ρ)² − ‖q_b‖². The kernel takes T₁ = T₀ + E + 1e-9·(1 + (U + σ + ρ)² +
‖q_b‖²) (the margin covers the float64 evaluation of T₀ and of distances, as in
`_threshold_search`) and T′ = fl32↑(T₁ + 2γ_K·(1 + 2⁻⁶)·(|T₁| + 1)) (raised to 2⁻¹⁰⁰ when
smaller in magnitude, which keeps its parts normal; raising T′ only collects more). Since
|T′| ≤ 2(|T₁| + 1), γ_K·(1 + 2⁻⁶)·|T′| ≤ T′ − T₁, so R(w) ≤ c(w) − T₀ − 1e-9·(…) < 0: its
sign bit is set. The kernel records every word whose result has its sign bit set (a negative
number or −0: a superset). A recorded word's float64 distance is measured in C at once (its
own summation order, within a relative 1e-14 of numpy's formula, far inside the 1e-9 margin);
if it enters the k best distinct words, U shrinks and T′ is rewritten into the query's row for
the blocks after it. T′ is never below its value for the final U, which is at least the k-th
nearest distance, so every word within the final U is recorded: the k nearest words, anything
tied with the k-th, and the k words that define the final U (each was scanned under a
threshold at least the final one), so at least k words. The caller ranks the recorded words
by numpy's float64 formula, ties to the smaller id: the float64 scan's answer. A query with
more than `cap` recorded words gets T′ = −10³⁰ (nothing passes) and is marked; the caller
answers it another way (the FAISS certificate).

Cost (docs/performance.md, "The Laplace family"): the slack σ + ρ ≈ 0.03 on the default
GloVe-50d index (ρ = 0.024, nearest distances ~5) records ~2 words per point at ε = 10.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from typing import Any

import numpy as np

from privtext.index import EmbeddingIndex

_U = 2.0**-24
_TINY = 2.0**-126
_GROUP = 32  # queries per pass of the kernel (two 16-row tiles)
_BATCH = 2048  # queries per kernel call: bounds the candidate buffers
_CHUNK_BLOCKS = 256  # 4,096 words (512 KiB of packed words at m = 50) per pass: stays in L2
ABI_VERSION = 6  # must equal PT_ABI_VERSION in _amx_kernel.c (a stale build is not used)
DISABLE_ENV = "PRIVTEXT_AMX"  # "off": never use the kernel (the numpy path answers the same)

_ptr = ctypes.c_void_p


class _Scan(ctypes.Structure):
    """Mirror of `pt_scan` in _amx_kernel.c (same order, natural alignment)."""

    _fields_ = [
        ("words", _ptr), ("nblocks", ctypes.c_int64), ("n", ctypes.c_int64),
        ("pairs", ctypes.c_int32), ("m", ctypes.c_int32), ("vectors", _ptr),
        ("queries", _ptr), ("points", _ptr), ("nq", ctypes.c_int64),
        ("k", ctypes.c_int32), ("cap", ctypes.c_int32),
        ("best_ids", _ptr), ("best_dist", _ptr), ("shift", _ptr), ("qn2", _ptr), ("err", _ptr),
        ("counts", _ptr), ("over", _ptr), ("cand_q", _ptr), ("cand_w", _ptr),
        ("ncand", ctypes.c_int64), ("chunk_blocks", ctypes.c_int64), ("gamma", ctypes.c_double),
        ("probe", _ptr), ("probe_width", ctypes.c_int32), ("record", ctypes.c_int32),
    ]


_LIB: list[Any] = []  # [] not tried yet; [None] unavailable; [lib] loaded
_LOCK = threading.Lock()


def _library() -> Any:
    with _LOCK:
        if not _LIB:
            _LIB.append(_load())
        return _LIB[0]


def _load() -> Any:
    if os.environ.get(DISABLE_ENV, "").lower() in ("off", "0", "no", "false"):
        return None
    spec = importlib.util.find_spec("privtext.mechanisms._amx_kernel")
    if spec is None or not spec.origin:
        return None  # not compiled at install (no compiler, another platform)
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    try:
        lib.pt_abi_version.restype = ctypes.c_int
        if lib.pt_abi_version() != ABI_VERSION:
            return None  # compiled from another version of the source: run `make install`
    except AttributeError:
        return None
    lib.pt_amx_available.restype = ctypes.c_int
    lib.pt_amx_scan.restype = ctypes.c_int64
    lib.pt_amx_scan.argtypes = [ctypes.POINTER(_Scan)]
    lib.pt_amx_products.restype = ctypes.c_int64
    lib.pt_graph_search.restype = ctypes.c_int64
    lib.pt_graph_search.argtypes = [_ptr, ctypes.c_int32, ctypes.c_int64, _ptr, ctypes.c_int32,
                                    _ptr, ctypes.c_int64, _ptr, ctypes.c_int32, ctypes.c_int32,
                                    _ptr, _ptr, _ptr, _ptr]
    lib.pt_amx_products.argtypes = [ctypes.POINTER(_Scan), ctypes.c_void_p]
    # Asks the kernel for the tile-data permission of this process (idempotent; a forked
    # worker inherits it, and asks again harmlessly).
    if not lib.pt_amx_available():
        return None
    return lib


def available() -> bool:
    """True when the compiled kernel is installed and this CPU and kernel run AMX-BF16."""
    return _library() is not None


def reset() -> None:
    """Forget whether the kernel loaded (tests switch ``PRIVTEXT_AMX`` and ask again)."""
    with _LOCK:
        _LIB.clear()


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of finite float32 values, round to nearest even; magnitudes
    below 2⁻¹²⁶ become 0 (the hardware treats subnormal inputs as zero)."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    u = f.view(np.uint32)
    # No overflow: the largest finite pattern, 0xFF7FFFFF, plus 0x8000 stays below 2³².
    out = ((u + ((u >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype(np.uint16)
    out[(u & np.uint32(0x7F800000)) == 0] = 0  # zero exponent: zero or subnormal
    return out


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """float64 values of bf16 bit patterns (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


class PackedWords:
    """The vocabulary in the kernel's layout: for each block of 16 words, K/2 rows of 16 bf16
    pairs (the B tiles, 1 KiB per 32 dimensions), plus ρ and M_b of the proof."""

    def __init__(self, vectors: np.ndarray) -> None:
        v32 = np.ascontiguousarray(vectors, dtype=np.float32)
        n, m = v32.shape
        self.n, self.m = n, m
        self.pairs = 16 * ((m + 6 + 31) // 32)  # φ_b, hi, mid, lo, then three ones for T'

        bits = bf16_bits(v32)
        vb = (bits.astype(np.uint32) << 16).view(np.float32)  # the bf16 values, exact in float32
        # φ − φ_b is exact in float32 (Sterbenz: φ_b is within a factor 1 ± 2⁻⁸ of φ, or 0 for
        # a flushed subnormal); squares and sums in float64, as the proof measures ρ and N.
        diff = v32 - vb
        self.rho = float(np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64).max(initial=0.0)))
        self.rho *= 1 + 1e-6
        norm = np.einsum("ij,ij->i", vb, vb, dtype=np.float64).astype(np.float32)
        hi = bf16_bits(norm)
        rest = norm - bf16_values(hi).astype(np.float32)  # exact: ≤ 16 significant bits left
        mid = bf16_bits(rest)
        lo = bf16_bits(rest - bf16_values(mid).astype(np.float32))
        parts = bf16_values(hi) + bf16_values(mid) + bf16_values(lo)
        if not np.array_equal(parts, norm.astype(np.float64)):  # the proof needs it exact
            raise ArithmeticError("bf16 split of the stored norms is not exact")
        self.max_norm = float(np.sqrt(norm.max(initial=0.0)))
        blocks = (n + 15) // 16
        cols = np.zeros((blocks * 16, 2 * self.pairs), dtype=np.uint16)
        cols[:n, :m] = bits
        cols[:n, m], cols[:n, m + 1], cols[:n, m + 2] = hi, mid, lo
        cols[:, m + 3 : m + 6] = bf16_bits(np.ones(1, dtype=np.float32))[0]
        # Padding words: a huge norm keeps them above every threshold (and C skips ids ≥ n).
        cols[n:, m] = bf16_bits(np.array([1e30], dtype=np.float32))[0]
        self.blocks = blocks
        self.words = np.ascontiguousarray(
            cols.reshape(blocks, 16, self.pairs, 2).transpose(0, 2, 1, 3)).view(np.uint32).ravel()
        self.vectors = v32


_PACKED: dict[str, PackedWords] = {}


def packed_words(index: EmbeddingIndex) -> PackedWords:
    key = str(index.path)
    with _LOCK:
        if key not in _PACKED:
            _PACKED[key] = PackedWords(index.vectors)
        return _PACKED[key]


def collect(index: EmbeddingIndex, noisy: np.ndarray, probe: np.ndarray, k: int,
            cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs (point row, word id), each pair once, that include every word within
    the final U of each point (module docstring), hence its k nearest words and anything tied
    with the k-th; and a mask of points with more than `cap` candidates (theirs are
    incomplete). U starts at the k-th smallest float64 distance among the words `probe[i]`
    (any real words: −1 or fewer than k leaves U infinite at first). Requires `available()`."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the AMX kernel is not available")
    packed = packed_words(index)
    t = len(noisy)
    probe = np.ascontiguousarray(probe, dtype=np.int32)
    cand_q: list[np.ndarray] = []
    cand_w: list[np.ndarray] = []
    over = np.zeros(t, dtype=bool)
    gamma = _gamma(packed) * (1 + 2.0**-6)
    for lo in range(0, t, _BATCH):
        z = np.ascontiguousarray(noisy[lo : lo + _BATCH], dtype=np.float64)
        nq = len(z)
        queries, shift, qn2, err = _queries(packed, z)
        rows = np.ascontiguousarray(probe[lo : lo + nq])
        best_ids = np.empty((nq, k), dtype=np.int64)  # the kernel's own U bookkeeping
        best_dist = np.empty((nq, k), dtype=np.float64)
        counts = np.zeros(nq, dtype=np.int32)
        flags = np.zeros(nq, dtype=np.uint8)
        out_q = np.empty(nq * (cap + 1), dtype=np.int32)
        out_w = np.empty(nq * (cap + 1), dtype=np.int32)
        scan = _Scan(packed.words.ctypes.data, packed.blocks, packed.n, packed.pairs, packed.m,
                     packed.vectors.ctypes.data, queries.ctypes.data, z.ctypes.data, nq, k, cap,
                     best_ids.ctypes.data, best_dist.ctypes.data, shift.ctypes.data,
                     qn2.ctypes.data, err.ctypes.data, counts.ctypes.data, flags.ctypes.data,
                     out_q.ctypes.data, out_w.ctypes.data, 0, _CHUNK_BLOCKS, gamma,
                     rows.ctypes.data, rows.shape[1], 1)
        found = lib.pt_amx_scan(ctypes.byref(scan))
        if found < 0:
            raise RuntimeError("the AMX kernel is not compiled for this platform")
        cand_q.append(out_q[:found].astype(np.int64) + lo)
        cand_w.append(out_w[:found].astype(np.int64))
        over[lo : lo + nq] = flags.astype(bool)
    return np.concatenate(cand_q), np.concatenate(cand_w), over


def _queries(packed: PackedWords, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The A rows (−2q_b, 1, 1, 1, 0…) padded to a multiple of 32 queries, and per query
    σ + ρ, ‖q_b‖² and E of the module docstring."""
    nq = len(z)
    steps = 2 * packed.pairs  # K, the products summed per result
    gamma = _gamma(packed)
    qb = bf16_values(bf16_bits(z.astype(np.float32)))
    shift = 2.0 * np.linalg.norm(z - qb, axis=1) + packed.rho
    qn2 = np.einsum("ij,ij->i", qb, qb)
    err = (gamma * (1 + 2.0**-6) * (np.sqrt(qn2) + packed.max_norm) ** 2
           + 2 * _U * packed.max_norm**2 + steps * _TINY)
    padded = -(-nq // _GROUP) * _GROUP
    rows = np.zeros((padded, 2 * packed.pairs), dtype=np.uint16)
    rows[:nq, : packed.m] = bf16_bits((-2.0 * qb).astype(np.float32))  # exact doubling
    rows[:nq, packed.m : packed.m + 3] = bf16_bits(np.ones(1, dtype=np.float32))[0]
    return rows.view(np.uint32), shift, qn2, err


def _gamma(packed: PackedWords) -> float:
    """γ_K = K·2u/(1 − K·2u) for the K = 2·pairs products of one result."""
    steps = 2 * packed.pairs
    return steps * 2 * _U / (1 - steps * 2 * _U)


def products(index: EmbeddingIndex, noisy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every kernel product C(w) for a few points (t × n, float64 of the fp32 results) and
    each point's bound E: for the tests of |C(w) − c(w)| ≤ E. Requires `available()`."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the AMX kernel is not available")
    packed = packed_words(index)
    z = np.ascontiguousarray(noisy, dtype=np.float64)
    queries, _, _, err = _queries(packed, z)
    out = np.zeros((len(queries), packed.blocks * 16), dtype=np.float32)
    scan = _Scan(packed.words.ctypes.data, packed.blocks, packed.n, packed.pairs, packed.m,
                 packed.vectors.ctypes.data, queries.ctypes.data, z.ctypes.data, len(z))
    if lib.pt_amx_products(ctypes.byref(scan), out.ctypes.data) < 0:
        raise RuntimeError("the AMX kernel is not compiled for this platform")
    return out[: len(z), : packed.n].astype(np.float64), err


def nearest_of_first(index: EmbeddingIndex, noisy: np.ndarray, count: int) -> np.ndarray:
    """For each point, its nearest word among the first `count` ids (rounded up to a multiple
    of 16; the vocabulary is in frequency order, so these are the most frequent words), by the
    kernel's float64 distance (int32 ids). The scan of `collect` without candidates: U starts
    at ∞ and tightens as nearer words turn up. Computed from the point alone. Requires
    `available()`."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the AMX kernel is not available")
    packed = packed_words(index)
    blocks = min(packed.blocks, -(-count // 16))
    gamma = _gamma(packed) * (1 + 2.0**-6)
    entry = np.empty(len(noisy), dtype=np.int32)
    # U starts at the nearest of the first 16 words (the same for every point): fewer
    # improvements, each of which costs a slow pass over a block, than from U = ∞.
    start = np.arange(min(16, packed.n), dtype=np.int32)
    for lo in range(0, len(noisy), _BATCH):
        z = np.ascontiguousarray(noisy[lo : lo + _BATCH], dtype=np.float64)
        nq = len(z)
        queries, shift, qn2, err = _queries(packed, z)
        best_ids = np.empty((nq, 1), dtype=np.int64)
        best_dist = np.empty((nq, 1), dtype=np.float64)
        flags = np.zeros(nq, dtype=np.uint8)
        probe = np.ascontiguousarray(np.broadcast_to(start, (nq, len(start))))  # kept alive
        scan = _Scan(packed.words.ctypes.data, blocks, packed.n, packed.pairs, packed.m,
                     packed.vectors.ctypes.data, queries.ctypes.data, z.ctypes.data, nq, 1, 0,
                     best_ids.ctypes.data, best_dist.ctypes.data, shift.ctypes.data,
                     qn2.ctypes.data, err.ctypes.data, None, flags.ctypes.data, None, None, 0,
                     _CHUNK_BLOCKS, gamma, probe.ctypes.data, len(start), 0)
        if lib.pt_amx_scan(ctypes.byref(scan)) < 0:
            raise RuntimeError("the AMX kernel is not compiled for this platform")
        entry[lo : lo + nq] = best_ids[:, 0]
    return entry


def graph_search(adjacency: np.ndarray, vectors: np.ndarray, queries: np.ndarray,
                 entry: np.ndarray, ef: int, k: int) -> np.ndarray:
    """`pt_graph_search` (its comment): the k nearest words that a best-first search of the
    graph `adjacency` (n × deg int32, −1 ends a list) finds from `entry[i]` for queries[i],
    keeping `ef` words; (t, k) int64 ids. Approximate. Requires `available()`."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the AMX kernel is not available")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    adjacency = np.ascontiguousarray(adjacency, dtype=np.int32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    entry = np.ascontiguousarray(entry, dtype=np.int32)
    n, deg = adjacency.shape
    ef = max(int(ef), k)
    out = np.empty((len(queries), k), dtype=np.int64)
    visited = np.zeros(n, dtype=np.uint32)
    epoch = np.zeros(1, dtype=np.uint32)
    work = np.empty(2 * (ef + 1 + ef * deg + deg), dtype=np.int32)  # (float, int32) items
    if lib.pt_graph_search(vectors.ctypes.data, vectors.shape[1], n, adjacency.ctypes.data, deg,
                           queries.ctypes.data, len(queries), entry.ctypes.data, ef, k,
                           out.ctypes.data, visited.ctypes.data, epoch.ctypes.data,
                           work.ctypes.data) < 0:
        raise RuntimeError("the graph search refused its arguments")
    return out
