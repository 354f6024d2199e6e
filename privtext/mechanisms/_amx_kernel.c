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

/* Everything one scan needs; the layout is mirrored by a ctypes.Structure. */
typedef struct {
    const uint32_t *words;  /* nblocks x pairs x 16 uint32 (a bf16 pair per word) */
    int64_t nblocks;
    int64_t n;              /* real words; padded ones are never recorded */
    int32_t pairs;          /* 16 * ksteps */
    int32_t m;
    const float *vectors;   /* n x m float32, the stored vectors */
    const uint32_t *queries;/* nq_padded x pairs (nq_padded a multiple of 32) */
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
} pt_scan;

static float pt_threshold(const pt_scan *s, int64_t q) {
    double far = s->best_dist[q * s->k + s->k - 1] + s->shift[q];
    far *= far;
    double t = far - s->qn2[q] + s->err[q] + 1e-9 * (1.0 + far + s->qn2[q]);
    float f = (float)t;
    if ((double)f < t) f = nextafterf(f, INFINITY); /* never below the float64 threshold */
    return f;
}

/* Record word w for query q; tighten U when w enters the k best. Returns the new threshold. */
static float pt_take(pt_scan *s, int64_t q, int64_t w, float current) {
    if (w >= s->n || s->over[q]) return current;
    if (s->counts[q]++ >= s->cap) {
        s->over[q] = 1;
        return -INFINITY;
    }
    s->cand_q[s->ncand] = (int32_t)q;
    s->cand_w[s->ncand] = (int32_t)w;
    s->ncand++;
    const float *v = s->vectors + w * s->m;
    const double *z = s->points + q * s->m;
    double acc = 0.0;
    for (int i = 0; i < s->m; i++) {
        double d = (double)v[i] - z[i];
        acc += d * d;
    }
    double d = sqrt(acc);
    int k = s->k;
    int64_t *ids = s->best_ids + q * k;
    double *dist = s->best_dist + q * k;
    if (!(d < dist[k - 1])) return current;
    for (int j = 0; j < k; j++)
        if (ids[j] == w) return current; /* keep the k words distinct */
    int j = k - 1;
    while (j > 0 && dist[j - 1] > d) {
        dist[j] = dist[j - 1];
        ids[j] = ids[j - 1];
        j--;
    }
    dist[j] = d;
    ids[j] = w;
    return pt_threshold(s, q);
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
    int avx512 = (b >> 16) & 1 && (b >> 30) & 1;         /* AVX512F, AVX512BW */
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

/* Compare the 32 stored rows (32 queries x 16 words) with the thresholds; record hits. */
__attribute__((target("avx512f,avx512bw")))
static inline void pt_compare(pt_scan *s, float (*rows)[16], float *t, int64_t q0, int64_t word0) {
    __mmask16 any = 0;
    for (int j = 0; j < 32; j++)
        any |= _mm512_cmp_ps_mask(_mm512_load_ps(rows[j]), _mm512_set1_ps(t[j]), _CMP_LT_OQ);
    if (__builtin_expect(any == 0, 1)) return;
    for (int j = 0; j < 32; j++) {
        uint32_t bits = _mm512_cmp_ps_mask(_mm512_load_ps(rows[j]), _mm512_set1_ps(t[j]), _CMP_LT_OQ);
        while (bits) {
            int l = __builtin_ctz(bits);
            bits &= bits - 1;
            /* t[j] may have tightened on an earlier word of this row */
            if (rows[j][l] < t[j]) t[j] = pt_take(s, q0 + j, word0 + l, t[j]);
        }
    }
}

/* Tiles: 0-3 the two query groups' A (k-steps 0 and 1, resident when ksteps <= 2),
 * 4-5 the word block's B, 6-7 the two 16 x 16 fp32 results. */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))
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
    float t[32];
    s->ncand = 0;
    for (int64_t c0 = 0; c0 < s->nblocks; c0 += s->chunk_blocks) {
        int64_t c1 = c0 + s->chunk_blocks < s->nblocks ? c0 + s->chunk_blocks : s->nblocks;
        for (int64_t q0 = 0; q0 < s->nq; q0 += 32) {
            const uint32_t *g0 = s->queries + q0 * s->pairs;
            const uint32_t *g1 = g0 + 16 * s->pairs;
            for (int j = 0; j < 32; j++)
                t[j] = (q0 + j < s->nq && !s->over[q0 + j]) ? pt_threshold(s, q0 + j) : -INFINITY;
            if (ksteps <= 2) {
                _tile_loadd(0, g0, qstride);
                _tile_loadd(2, g1, qstride);
                if (ksteps == 2) {
                    _tile_loadd(1, g0 + 16, qstride);
                    _tile_loadd(3, g1 + 16, qstride);
                }
            }
            for (int64_t b = c0; b < c1; b++) {
                const uint32_t *wb = s->words + b * 16 * s->pairs;
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
                pt_compare(s, rows, t, q0, b * 16);
            }
        }
    }
    _tile_release();
    return s->ncand;
}

#else

int pt_amx_available(void) { return 0; }
int64_t pt_amx_scan(pt_scan *s) { (void)s; return -1; }

#endif

static struct PyModuleDef pt_module = {PyModuleDef_HEAD_INIT, "_amx_kernel",
                                       "bf16 AMX kernel of the exact nearest-word search (ctypes)",
                                       -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__amx_kernel(void) { return PyModule_Create(&pt_module); }
