/* The bf16 AMX collection kernel of the exact nearest-word search.
 *
 * The proof that the search stays exact, the layouts and the Python side are in
 * privtext/mechanisms/amx_search.py; this file only does what that docstring describes:
 *
 *   for every 16-word block of the packed vocabulary and every group of 32 queries,
 *   C = A · B with TDPBF16PS (bf16 products, fp32 sums), where a query row holds
 *   (-2·bf16(z), 1, 1, 1, 0...) and a word column (bf16(φ), hi, mid, lo, 0...) with
 *   hi + mid + lo = fl32(‖bf16(φ)‖²) exactly, so C ≈ ‖φ_b‖² − 2 q_b·φ_b;
 *   every word whose C is below the query's threshold is recorded as a candidate, its
 *   float64 distance is measured, and the threshold tightens when it enters the k best.
 *
 * It is loaded with ctypes (no Python object crosses); the module init exists only so the
 * file is an ordinary extension module that importlib can find. Linux x86-64 only; the
 * caller checks `pt_amx_available()` before anything else. */

#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && (__GNUC__ >= 11)
#define PT_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* Bumped with every change of pt_scan or of a function's meaning: amx_search.py refuses a
 * compiled kernel of another version (a stale build) and uses its numpy path instead. */
#define PT_ABI_VERSION 6

int pt_abi_version(void) { return PT_ABI_VERSION; }

/* Everything one scan needs; the layout is mirrored by a ctypes.Structure. */
typedef struct {
    const uint32_t *words;  /* nblocks x pairs x 16 uint32 (a bf16 pair per word) */
    int64_t nblocks;
    int64_t n;              /* real words; padded ones are never recorded */
    int32_t pairs;          /* 16 * ksteps */
    int32_t m;
    const float *vectors;   /* n x m float32, the stored vectors */
    uint32_t *queries;      /* nq_padded x pairs (nq_padded a multiple of 32); the scan writes
                               each query's threshold into its row */
    const double *points;   /* nq x m float64, the noisy points z */
    int64_t nq;
    int32_t k;
    int32_t cap;            /* more candidates than this: the query is marked over */
    int64_t *best_ids;      /* nq x k, in/out: k distinct words, nearest first */
    double *best_dist;      /* nq x k, in/out: their float64 distances */
    const double *shift;    /* per query: 2‖z − q_b‖ + ρ */
    const double *qn2;      /* per query: ‖q_b‖² */
    const double *err;      /* per query: E, the bound on the product's rounding */
    int32_t *counts;        /* per query: candidates recorded */
    uint8_t *over;          /* per query: 1 once counts exceeded cap */
    int32_t *cand_q;        /* capacity nq * (cap + 1) */
    int32_t *cand_w;
    int64_t ncand;          /* out */
    int64_t chunk_blocks;   /* word blocks per pass over the query groups (kept in L2) */
    double gamma;           /* γ_K·(1 + 2⁻⁶): the sum's error per unit of Σ|terms| */
    const int32_t *probe;   /* nq x probe_width word ids whose k nearest start U (any real words) */
    int32_t probe_width;
    int32_t record;         /* 0: keep only the k best (best_ids), record no candidates, no cap */
} pt_scan;

static uint16_t pt_bf16(float x) { /* round to nearest even (finite x) */
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static float pt_from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* Write −T' into query q's row (columns m+3..m+5 as three bf16 parts summing to −T' exactly),
 * T' the folded threshold of amx_search's docstring: a word with d(z, w) ≤ U gives a product
 * R(w) < 0. An over query gets T' = −1e30: nothing passes. */
static void pt_fold(pt_scan *s, int64_t q) {
    double t1;
    if (s->record && s->over[q]) {
        t1 = -1e30;
    } else {
        double far = s->best_dist[q * s->k + s->k - 1] + s->shift[q];
        far *= far;
        t1 = far - s->qn2[q] + s->err[q] + 1e-9 * (1.0 + far + s->qn2[q]);
        t1 += 2.0 * s->gamma * (fabs(t1) + 1.0);
        if (fabs(t1) < 0x1p-100) t1 = 0x1p-100; /* keeps the parts normal; raising T' is safe */
        if (!(t1 < 1e30)) t1 = 1e30;             /* fewer than k words yet (U = ∞): take all */
    }
    float tf = (float)t1;
    if ((double)tf < t1) tf = nextafterf(tf, INFINITY);
    uint16_t hi = pt_bf16(tf);
    float r = tf - pt_from_bf16(hi); /* exact: at most 16 significant bits are left */
    uint16_t mid = pt_bf16(r);
    uint16_t lo = pt_bf16(r - pt_from_bf16(mid));
    if ((double)pt_from_bf16(hi) + pt_from_bf16(mid) + pt_from_bf16(lo) != (double)tf) {
        hi = pt_bf16(1e30f); /* cannot happen for normal floats; if it did, collect everything */
        mid = lo = 0;
    }
    uint16_t *row = (uint16_t *)(s->queries + q * s->pairs);
    row[s->m + 3] = hi ^ 0x8000u; /* negation flips the sign bit, exactly */
    row[s->m + 4] = mid ^ 0x8000u;
    row[s->m + 5] = lo ^ 0x8000u;
}

/* float64 ‖z_q − φ(w)‖ (eight lanes where AVX-512 runs; any summation order keeps it within a
 * relative 1e-14 of numpy's, which the proof allows for). */
#ifdef PT_HAVE_AMX
__attribute__((target("avx512f,avx512vl")))
#endif
static double pt_distance(const pt_scan *s, int64_t q, int64_t w) {
    const float *v = s->vectors + w * s->m;
    const double *z = s->points + q * s->m;
#ifdef PT_HAVE_AMX
    __m512d acc = _mm512_setzero_pd();
    int i = 0;
    for (; i + 8 <= s->m; i += 8) {
        __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(v + i)), _mm512_loadu_pd(z + i));
        acc = _mm512_fmadd_pd(d, d, acc);
    }
    if (i < s->m) {
        __mmask8 mk = (__mmask8)((1u << (s->m - i)) - 1);
        __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, v + i)),
                                  _mm512_maskz_loadu_pd(mk, z + i));
        acc = _mm512_fmadd_pd(d, d, acc);
    }
    return sqrt(_mm512_reduce_add_pd(acc));
#else
    double acc = 0.0;
    for (int i = 0; i < s->m; i++) {
        double d = (double)v[i] - z[i];
        acc += d * d;
    }
    return sqrt(acc);
#endif
}

/* Put w at distance d among query q's k best distinct words, if it belongs there; 1 if so. */
static int pt_insert(pt_scan *s, int64_t q, int64_t w, double d) {
    int k = s->k;
    int64_t *ids = s->best_ids + q * k;
    double *dist = s->best_dist + q * k;
    if (!(d < dist[k - 1])) return 0;
    for (int j = 0; j < k; j++)
        if (ids[j] == w) return 0; /* keep the k words distinct */
    int j = k - 1;
    while (j > 0 && dist[j - 1] > d) {
        dist[j] = dist[j - 1];
        ids[j] = ids[j - 1];
        j--;
    }
    dist[j] = d;
    ids[j] = w;
    return 1;
}

/* U from the probe words: the k-th distance among the k nearest of them (∞ if fewer). */
static void pt_start(pt_scan *s, int64_t q) {
    for (int j = 0; j < s->k; j++) {
        s->best_ids[q * s->k + j] = -1;
        s->best_dist[q * s->k + j] = INFINITY;
    }
    for (int j = 0; j < s->probe_width; j++) {
        int64_t w = s->probe[q * s->probe_width + j];
        if (w >= 0 && w < s->n) pt_insert(s, q, w, pt_distance(s, q, w));
    }
}

/* Record word w for query q; tighten U when w enters the k best. Returns 1 when query q's
 * threshold changed (U tightened, or the query went over its cap). */
static int pt_take(pt_scan *s, int64_t q, int64_t w) {
    if (w >= s->n || q >= s->nq) return 0;
    if (!s->record) return pt_insert(s, q, w, pt_distance(s, q, w));
    if (s->over[q]) return 0;
    if (s->counts[q]++ >= s->cap) {
        s->over[q] = 1;
        return 1;
    }
    s->cand_q[s->ncand] = (int32_t)q;
    s->cand_w[s->ncand] = (int32_t)w;
    s->ncand++;
    return pt_insert(s, q, w, pt_distance(s, q, w));
}

#ifdef PT_HAVE_AMX

#define PT_ARCH_GET_XCOMP_PERM 0x1022
#define PT_ARCH_REQ_XCOMP_PERM 0x1023
#define PT_XFEATURE_XTILEDATA 18

/* 1 when this CPU and kernel run AVX-512 and AMX-BF16 for this process (asks the kernel
 * for the tile data permission, which is per process and idempotent), else 0. */
int pt_amx_available(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    int avx512 = (b >> 16) & 1 && (b >> 17) & 1 && (b >> 30) & 1 && (b >> 31) & 1; /* F DQ BW VL */
    int amx = (d >> 22) & 1 && (d >> 24) & 1;            /* AMX-BF16, AMX-TILE */
    int osxsave = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) osxsave = (c >> 27) & 1;
    if (!avx512 || !amx || !osxsave) return 0;
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    uint64_t xcr0 = ((uint64_t)hi << 32) | lo;
    if ((xcr0 & 0xE6) != 0xE6) return 0;                 /* SSE, AVX, opmask, ZMM state */
    if ((xcr0 & (3ull << 17)) != (3ull << 17)) return 0; /* XTILECFG, XTILEDATA */
    if (syscall(SYS_arch_prctl, PT_ARCH_REQ_XCOMP_PERM, PT_XFEATURE_XTILEDATA)) return 0;
    unsigned long perm = 0;
    if (syscall(SYS_arch_prctl, PT_ARCH_GET_XCOMP_PERM, &perm)) return 0;
    return (perm >> PT_XFEATURE_XTILEDATA) & 1;
}

typedef struct __attribute__((packed)) {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} pt_tilecfg;

/* The 32 stored rows (32 queries x 16 words) of R = C − T': record every word whose R has its
 * sign bit set. One OR over all rows decides whether any has; returns 1 when a threshold
 * changed (the A tiles must be reloaded). */
__attribute__((target("avx512f,avx512bw,avx512dq")))
static inline int pt_compare(pt_scan *s, float (*rows)[16], int64_t q0, int64_t word0) {
    const __m512i *r = (const __m512i *)rows;
    __m512i a = r[0];
    for (int j = 1; j < 31; j += 2) a = _mm512_ternarylogic_epi32(a, r[j], r[j + 1], 0xFE); /* OR */
    a = _mm512_or_si512(a, r[31]);
    if (__builtin_expect(_mm512_movepi32_mask(a) == 0, 1)) return 0;
    int changed = 0;
    for (int j = 0; j < 32; j++) {
        uint32_t bits = _mm512_movepi32_mask(r[j]);
        int mine = 0;
        while (bits) {
            int l = __builtin_ctz(bits);
            bits &= bits - 1;
            mine |= pt_take(s, q0 + j, word0 + l);
        }
        if (mine) {
            pt_fold(s, q0 + j);
            changed = 1;
        }
    }
    return changed;
}

/* Tiles: 0-3 the two query groups' A (k-steps 0 and 1, resident when ksteps <= 2),
 * 4-5 the word block's B, 6-7 the two 16 x 16 fp32 results. */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq")))
int64_t pt_amx_scan(pt_scan *s) {
    pt_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
    const int ksteps = s->pairs / 16;
    const int64_t qstride = (int64_t)s->pairs * 4; /* bytes per query row */
    float rows[32][16] __attribute__((aligned(64)));
    s->ncand = 0;
    for (int64_t q = 0; q < s->nq; q++) {
        pt_start(s, q);
        pt_fold(s, q);
    }
    for (int64_t c0 = 0; c0 < s->nblocks; c0 += s->chunk_blocks) {
        int64_t c1 = c0 + s->chunk_blocks < s->nblocks ? c0 + s->chunk_blocks : s->nblocks;
        for (int64_t q0 = 0; q0 < s->nq; q0 += 32) {
            const uint32_t *g0 = s->queries + q0 * s->pairs;
            const uint32_t *g1 = g0 + 16 * s->pairs;
            int reload = 1;
            for (int64_t b = c0; b < c1; b++) {
                const uint32_t *wb = s->words + b * 16 * s->pairs;
                if (reload && ksteps <= 2) {
                    _tile_loadd(0, g0, qstride);
                    _tile_loadd(2, g1, qstride);
                    if (ksteps == 2) {
                        _tile_loadd(1, g0 + 16, qstride);
                        _tile_loadd(3, g1 + 16, qstride);
                    }
                }
                _tile_zero(6);
                _tile_zero(7);
                if (ksteps <= 2) {
                    _tile_loadd(4, wb, 64);
                    _tile_dpbf16ps(6, 0, 4);
                    _tile_dpbf16ps(7, 2, 4);
                    if (ksteps == 2) {
                        _tile_loadd(5, wb + 256, 64);
                        _tile_dpbf16ps(6, 1, 5);
                        _tile_dpbf16ps(7, 3, 5);
                    }
                } else {
                    for (int st = 0; st < ksteps; st++) {
                        _tile_loadd(0, g0 + 16 * st, qstride);
                        _tile_loadd(2, g1 + 16 * st, qstride);
                        _tile_loadd(4, wb + 256 * st, 64);
                        _tile_dpbf16ps(6, 0, 4);
                        _tile_dpbf16ps(7, 2, 4);
                    }
                }
                _tile_stored(6, rows[0], 64);
                _tile_stored(7, rows[16], 64);
                reload = pt_compare(s, rows, q0, b * 16);
            }
        }
    }
    _tile_release();
    return s->ncand;
}

/* Every product C (nq x nblocks*16, row-major) of the scan's queries and words, for the tests
 * of the error bound (small sizes only). */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))
int64_t pt_amx_products(const pt_scan *s, float *out) {
    pt_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
    const int ksteps = s->pairs / 16;
    const int64_t qstride = (int64_t)s->pairs * 4, width = s->nblocks * 16;
    for (int64_t q0 = 0; q0 < s->nq; q0 += 16) {
        const uint32_t *g = s->queries + q0 * s->pairs;
        for (int64_t b = 0; b < s->nblocks; b++) {
            _tile_zero(6);
            for (int st = 0; st < ksteps; st++) {
                _tile_loadd(0, g + 16 * st, qstride);
                _tile_loadd(4, s->words + b * 16 * s->pairs + 256 * st, 64);
                _tile_dpbf16ps(6, 0, 4);
            }
            _tile_stored(6, out + q0 * width + b * 16, width * 4);
        }
    }
    _tile_release();
    return 0;
}


/* ---- The level-0 graph search of `--search hnsw` (nearest.py, `_graph_search`) ----------------
 * Best-first search of an HNSW graph's bottom layer from one entry word per query, keeping the
 * ef nearest words seen (float32 squared distances); the k nearest of them are returned, ties
 * to the smaller id. The same algorithm as FAISS's search_level_0 (HNSW search_layer), with
 * the neighbour lists as a dense (n, deg) table (-1 ends a short list), the unvisited
 * neighbours' vectors prefetched before their distances are computed, and a visited mark per
 * word (an epoch counter, so it is never cleared between queries). */

typedef struct {
    float d;
    int32_t id;
} pt_item;

static inline int pt_before(pt_item a, pt_item b) { return a.d < b.d || (a.d == b.d && a.id < b.id); }

static inline void pt_up_min(pt_item *h, int i) {
    pt_item x = h[i];
    while (i > 0) {
        int p = (i - 1) >> 1;
        if (!pt_before(x, h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}

static inline void pt_down_min(pt_item *h, int n, int i) {
    pt_item x = h[i];
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && pt_before(h[c + 1], h[c])) c++;
        if (!pt_before(h[c], x)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

static inline void pt_up_max(pt_item *h, int i) {
    pt_item x = h[i];
    while (i > 0) {
        int p = (i - 1) >> 1;
        if (!pt_before(h[p], x)) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}

static inline void pt_down_max(pt_item *h, int n, int i) {
    pt_item x = h[i];
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && pt_before(h[c], h[c + 1])) c++;
        if (!pt_before(x, h[c])) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

__attribute__((target("avx512f")))
static inline float pt_l2(const float *a, const float *b, int m) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= m; i += 16) {
        __m512 d = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
        acc = _mm512_fmadd_ps(d, d, acc);
    }
    if (i < m) {
        __mmask16 mk = (__mmask16)((1u << (m - i)) - 1);
        __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, a + i), _mm512_maskz_loadu_ps(mk, b + i));
        acc = _mm512_fmadd_ps(d, d, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Squared distances from q (its first 64 coordinates preloaded in qv, m <= 64) to four words at
 * once: one reduction for the four sums instead of four. */
__attribute__((target("avx512f,avx512dq")))
static inline __m128 pt_l2x4(const __m512 *qv, int chunks, __mmask16 tail, const float *a,
                             const float *b, const float *c, const float *d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int i = 0; i < chunks; i++) {
        __mmask16 mk = i == chunks - 1 ? tail : (__mmask16)0xFFFF;
        __m512 x0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, a + 16 * i), qv[i]);
        __m512 x1 = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, b + 16 * i), qv[i]);
        __m512 x2 = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, c + 16 * i), qv[i]);
        __m512 x3 = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, d + 16 * i), qv[i]);
        s0 = _mm512_fmadd_ps(x0, x0, s0);
        s1 = _mm512_fmadd_ps(x1, x1, s1);
        s2 = _mm512_fmadd_ps(x2, x2, s2);
        s3 = _mm512_fmadd_ps(x3, x3, s3);
    }
    __m256 h0 = _mm256_add_ps(_mm512_castps512_ps256(s0), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s0), 1)));
    __m256 h1 = _mm256_add_ps(_mm512_castps512_ps256(s1), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s1), 1)));
    __m256 h2 = _mm256_add_ps(_mm512_castps512_ps256(s2), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s2), 1)));
    __m256 h3 = _mm256_add_ps(_mm512_castps512_ps256(s3), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s3), 1)));
    __m128 q0 = _mm_add_ps(_mm256_castps256_ps128(h0), _mm256_extractf128_ps(h0, 1));
    __m128 q1 = _mm_add_ps(_mm256_castps256_ps128(h1), _mm256_extractf128_ps(h1, 1));
    __m128 q2 = _mm_add_ps(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1));
    __m128 q3 = _mm_add_ps(_mm256_castps256_ps128(h3), _mm256_extractf128_ps(h3, 1));
    return _mm_hadd_ps(_mm_hadd_ps(q0, q1), _mm_hadd_ps(q2, q3));
}

/* `work`: at least ef + 1 + ef * deg + deg items; `visited`: n uint32, zero at first use;
 * `epoch`: in/out, the last mark used. Returns 0, or -1 for bad arguments. */
__attribute__((target("avx512f,avx512dq")))
int64_t pt_graph_search(const float *vec, int32_t m, int64_t n, const int32_t *adj, int32_t deg,
                        const float *queries, int64_t nq, const int32_t *entry, int32_t ef,
                        int32_t k, int64_t *out, uint32_t *visited, uint32_t *epoch, pt_item *work) {
    if (ef < k || ef < 1 || deg > 4096 || m < 1) return -1;
    pt_item *res = work, *cand = work + ef + 1;
    int32_t todo[4096];
    for (int64_t qi = 0; qi < nq; qi++) {
        if (++*epoch == 0) {
            memset(visited, 0, (size_t)n * 4);
            *epoch = 1;
        }
        const uint32_t mark = *epoch;
        const float *q = queries + qi * m;
        const int chunks = (m + 15) / 16;
        const __mmask16 tail = (__mmask16)(m % 16 ? (1u << (m % 16)) - 1 : 0xFFFF);
        __m512 qv[4];
        if (m <= 64)
            for (int i = 0; i < chunks; i++)
                qv[i] = _mm512_maskz_loadu_ps(i == chunks - 1 ? tail : (__mmask16)0xFFFF, q + 16 * i);
        int32_t e = entry[qi];
        if (e < 0 || e >= n) e = 0;
        int nr = 0, nc = 0;
        float d0 = pt_l2(q, vec + (int64_t)e * m, m);
        visited[e] = mark;
        res[nr++] = (pt_item){d0, e};
        cand[nc++] = (pt_item){d0, e};
        while (nc) {
            pt_item c = cand[0];
            cand[0] = cand[--nc];
            if (nc) pt_down_min(cand, nc, 0);
            if (nr >= ef && pt_before(res[0], c)) break;
            const int32_t *nb = adj + (int64_t)c.id * deg;
            int nt = 0;
            for (int j = 0; j < deg; j++) {
                int32_t w = nb[j];
                if (w < 0) break;
                if (visited[w] == mark) continue;
                visited[w] = mark;
                todo[nt++] = w;
                const char *p = (const char *)(vec + (int64_t)w * m);
                for (int off = 0; off < m * 4; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
            }
            float dist[4096 + 4];
            int j0 = 0;
            if (m <= 64) {
                for (; j0 + 4 <= nt; j0 += 4) {
                    __m128 r = pt_l2x4(qv, chunks, tail, vec + (int64_t)todo[j0] * m,
                                       vec + (int64_t)todo[j0 + 1] * m, vec + (int64_t)todo[j0 + 2] * m,
                                       vec + (int64_t)todo[j0 + 3] * m);
                    _mm_storeu_ps(dist + j0, r);
                }
            }
            for (int j = j0; j < nt; j++) dist[j] = pt_l2(q, vec + (int64_t)todo[j] * m, m);
            for (int j = 0; j < nt; j++) {
                pt_item it = {dist[j], todo[j]};
                if (nr < ef || pt_before(it, res[0])) {
                    cand[nc] = it;
                    pt_up_min(cand, nc++);
                    if (nr < ef) {
                        res[nr] = it;
                        pt_up_max(res, nr++);
                    } else {
                        res[0] = it;
                        pt_down_max(res, nr, 0);
                    }
                }
            }
        }
        for (int j = 0; j < k; j++) { /* the k nearest of the ef kept, by (distance, id) */
            int best = -1;
            for (int i = 0; i < nr; i++)
                if (res[i].id >= 0 && (best < 0 || pt_before(res[i], res[best]))) best = i;
            out[qi * k + j] = best >= 0 ? res[best].id : res[0].id < 0 ? -1 - res[0].id : res[0].id;
            if (best >= 0) res[best].id = -1 - res[best].id;
        }
    }
    return 0;
}

#else

int pt_amx_available(void) { return 0; }
int64_t pt_amx_scan(pt_scan *s) { (void)s; return -1; }
int64_t pt_amx_products(const pt_scan *s, float *out) { (void)s; (void)out; return -1; }
int64_t pt_graph_search(const float *vec, int32_t m, int64_t n, const int32_t *adj, int32_t deg,
                        const float *queries, int64_t nq, const int32_t *entry, int32_t ef,
                        int32_t k, int64_t *out, uint32_t *visited, uint32_t *epoch, void *work) {
    return -1;
}

#endif

static struct PyModuleDef pt_module = {PyModuleDef_HEAD_INIT, "_amx_kernel",
                                       "bf16 AMX kernel of the exact nearest-word search (ctypes)",
                                       -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__amx_kernel(void) { return PyModule_Create(&pt_module); }
