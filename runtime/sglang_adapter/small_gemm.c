/* bf16 GEMM over packed weights: on Intel AMX the linear layers of a CPU decode step (up to 16
   rows); on CPUs with AVX2 but neither AMX nor oneDNN's bf16 GEMMs, every linear layer (below).

   A decode step multiplies a few rows (one per request in the batch) by each weight of the model:
   the cost is reading the weights, 270 MB per step for the default model. oneDNN's packed GEMMs
   read them at about 10-13 GB/s at 1-16 rows on an Intel Xeon host with AMX (2 cores); this kernel
   at 17-22, about what a plain 2-thread read of memory reaches there (docs/BENCHMARKS.md, "sixth
   round"):

   - the weight W [N, K] is packed once (runtime/sglang_adapter/cpu_linear.py) as blocks of 16
     output columns, [N/16][K/2][16][2] bf16: 16 consecutive k pairs of a block are one 1 KB tile,
     the second operand of TDPBF16PS;
   - a task takes two blocks (32 columns) and all rows (up to 16): per chunk of 32 k, one tile of
     the rows' inputs, two weight tiles, two products into fp32 accumulator tiles; the accumulators
     then go through memory for the bias (bf16, added in fp32) and the rounding to bf16 (round to
     nearest even);
   - the tasks, in column order, are split evenly between the OpenMP threads, so each thread
     streams one contiguous part of the packed weight, once.

   The AMX path is built only where the compiler targets AMX (-march=native on such a CPU) and used
   only where the kernel also grants this process the tile state (arch_prctl), else
   agent_rt_small_gemm_ready() says 0 and the caller keeps oneDNN. Built without AMX but with AVX2
   and FMA, the same function runs on fp32 FMAs for any number of rows (agent_rt_gemm_max_rows());
   runtime/sglang_adapter/native.py uses it only where oneDNN has no bf16 GEMM. */

#include <stdint.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int tiles_granted(void) {
    static int state = -1; /* -1: not asked yet */
    if (state < 0) {
        unsigned long bits = 0;
        state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 &&
                syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bits) == 0 && (bits & (1ul << XFEATURE_XTILEDATA));
    }
    return state;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

int agent_rt_small_gemm_ready(void) { return tiles_granted(); }

/* c[i, j] = sum_k a[i, k] w[j, k] (+ bias[j]) for i < m, j < n. a: bf16 rows lda apart; p: w packed
   as above ([n/16][k/2][16][2]); bias: bf16 [n] or NULL; c: bf16 rows ldc apart. 1 <= m <= 16, n a
   multiple of 16, k of 32 (else returns 1, nothing written); 0 when done. */
int agent_rt_small_gemm(const uint16_t *a, int64_t m, int64_t lda, const uint16_t *p, int64_t n, int64_t k,
                        const uint16_t *bias, uint16_t *c, int64_t ldc) {
    if (m < 1 || m > 16 || n % 16 || k % 32 || !tiles_granted()) return 1;
    const int64_t k2 = k / 2, blocks = n / 16, tasks = (blocks + 1) / 2;
#pragma omp parallel
    {
        /* tiles 0, 1: accumulators (m x 16 fp32); 2: inputs (m x 32 bf16); 3, 4: weights (16 x 32 bf16) */
        struct tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int t = 0; t < 5; t++) {
            cfg.rows[t] = t < 3 ? (uint8_t)m : 16;
            cfg.colsb[t] = 64;
        }
        _tile_loadconfig(&cfg);
        float acc[2][16 * 16] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            const int nb = 2 * t + 1 < blocks ? 2 : 1;
            const uint16_t *p0 = p + 2 * t * k2 * 32, *p1 = p0 + k2 * 32;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t kc = 0; kc < k2; kc += 16) {
                _tile_loadd(2, a + 2 * kc, lda * 2);
                _tile_loadd(3, p0 + kc * 32, 64);
                _tile_dpbf16ps(0, 2, 3);
                if (nb == 2) {
                    _tile_loadd(4, p1 + kc * 32, 64);
                    _tile_dpbf16ps(1, 2, 4);
                }
            }
            _tile_stored(0, acc[0], 64);
            if (nb == 2) _tile_stored(1, acc[1], 64);
            for (int b = 0; b < nb; b++) {
                __m512 bv = _mm512_setzero_ps();
                if (bias)
                    bv = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + 32 * t + b * 16))), 16));
                for (int64_t i = 0; i < m; i++)
                    _mm256_storeu_si256((__m256i *)(c + i * ldc + 32 * t + b * 16),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(acc[b] + i * 16), bv)));
            }
        }
        _tile_release();
    }
    return 0;
}

int agent_rt_gemm_max_rows(void) { return 16; }

#elif defined(__AVX2__) && defined(__FMA__) /* no AMX: fp32 FMAs on AVX2 */

/* The same packed weight, any number of rows: each 32-bit lane of a weight line holds one column's
   bf16 pair (k, k + 1), so a shift and a mask widen 8 columns' pair to two fp32 vectors, and the
   rows' inputs (widened to fp32 once per call) are broadcast against them. Each group of 8 rows
   takes a block in two passes, one per half (8 columns, one accumulator per row); the last rows
   (fewer than 8) take it in passes of up to 4 rows by the whole block (2 accumulators per row).
   Either way the accumulators, the widened pair and a broadcast fit AVX2's 16 registers. The tasks
   are blocks of columns, in order, split evenly between the OpenMP threads; a block's weight
   (16 columns x k, 18-48 KB on the default model) is read from memory by its first pass
   (prefetched 2 KB ahead: 5-15% faster at 1-8 rows) and from cache by the others. Sums are fp32
   in k order pairs, the same for a row in either kind of pass; the output is rounded to bf16
   (round to nearest even). Against passes of 4 rows only (docs/BENCHMARKS.md, "ninth round"):
   the same at 1-8 rows, 1.1x at 16, 1.3x at 64-256 (2 threads, the model's weights cold).
   Returns 1 for a shape it does not compute, 2 when out of memory. */

#include <immintrin.h>
#include <stdlib.h>

#define RB 4 /* rows per pass of a whole block */
#define HB 8 /* rows per pass of half a block */

int agent_rt_small_gemm_ready(void) { return 1; }

int agent_rt_gemm_max_rows(void) { return 1 << 30; }

static inline __m256 bf16_lo(__m256i w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
static inline __m256 bf16_hi(__m256i w) { return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u))); }

/* 8 bf16 -> 8 fp32 */
static inline __m256 widen8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 fp32 -> 8 bf16, round to nearest even; NaN stays NaN (as VCVTNEPS2BF16 on the AMX path) */
static inline __m128i to_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* One row's step: c += the pair (x[j], x[j + 1]) times the widened pair (a, b) of 8 columns. */
#define STEP(c, xr) (c) = _mm256_fmadd_ps(b, _mm256_broadcast_ss((xr) + j + 1), _mm256_fmadd_ps(a, _mm256_broadcast_ss((xr) + j), (c)))

/* rows x[0..R) (fp32, ldx apart; R 1-4) against one block w ([k2][16] bf16 pairs): out[r][16] fp32.
   Each half's pair is widened just before its FMAs and the accumulators are named, not an array:
   the compiler keeps them all in registers (with an array it kept one on the stack, whose store
   and reload lengthened that chain). */
static inline __attribute__((always_inline)) void block_pass(const float *x, int64_t ldx, const uint32_t *w, int64_t k2,
                                                              float *out, const int R) {
    const __m256 z = _mm256_setzero_ps();
    __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z;
    const float *x0 = x, *x1 = x + (R > 1) * ldx, *x2 = x + (R > 2) * 2 * ldx, *x3 = x + (R > 3) * 3 * ldx;
    for (int64_t kk = 0; kk < k2; kk++) {
        _mm_prefetch((const char *)(w + (kk + 32) * 16), _MM_HINT_T0); /* 2 KB ahead (a prefetch never faults) */
        const int64_t j = 2 * kk;
        __m256i wl = _mm256_loadu_si256((const __m256i *)(w + kk * 16));
        __m256 a = bf16_lo(wl), b = bf16_hi(wl);
        STEP(c00, x0);
        if (R > 1) STEP(c10, x1);
        if (R > 2) STEP(c20, x2);
        if (R > 3) STEP(c30, x3);
        if (R > 2) __asm__ __volatile__("" ::: "memory"); /* the second half broadcasts again: kept live, they spilled */
        wl = _mm256_loadu_si256((const __m256i *)(w + kk * 16 + 8));
        a = bf16_lo(wl), b = bf16_hi(wl);
        STEP(c01, x0);
        if (R > 1) STEP(c11, x1);
        if (R > 2) STEP(c21, x2);
        if (R > 3) STEP(c31, x3);
    }
    _mm256_storeu_ps(out, c00), _mm256_storeu_ps(out + 8, c01);
    if (R > 1) _mm256_storeu_ps(out + 16, c10), _mm256_storeu_ps(out + 24, c11);
    if (R > 2) _mm256_storeu_ps(out + 32, c20), _mm256_storeu_ps(out + 40, c21);
    if (R > 3) _mm256_storeu_ps(out + 48, c30), _mm256_storeu_ps(out + 56, c31);
}

static void pass_any(const float *x, int64_t ldx, const uint32_t *w, int64_t k2, float *out, int R) {
    switch (R) {
    case 1: block_pass(x, ldx, w, k2, out, 1); break;
    case 2: block_pass(x, ldx, w, k2, out, 2); break;
    case 3: block_pass(x, ldx, w, k2, out, 3); break;
    default: block_pass(x, ldx, w, k2, out, 4); break;
    }
}

/* rows x[0..8) against one half (8 columns) of a block: out[r][8] fp32 (16 apart). One accumulator
   per row, so 8 rows a pass: the pass that reads a block from memory does the FMAs of 8 rows, not 4. */
static void half_pass(const float *x, int64_t ldx, const uint32_t *w, int64_t k2, float *out) {
    const __m256 z = _mm256_setzero_ps();
    __m256 c0 = z, c1 = z, c2 = z, c3 = z, c4 = z, c5 = z, c6 = z, c7 = z;
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx, *x4 = x + 4 * ldx, *x5 = x + 5 * ldx,
                *x6 = x + 6 * ldx, *x7 = x + 7 * ldx;
    for (int64_t kk = 0; kk < k2; kk++) {
        _mm_prefetch((const char *)(w + (kk + 32) * 16), _MM_HINT_T0); /* 2 KB ahead (a prefetch never faults) */
        const int64_t j = 2 * kk;
        __m256i wl = _mm256_loadu_si256((const __m256i *)(w + kk * 16));
        __m256 a = bf16_lo(wl), b = bf16_hi(wl);
        STEP(c0, x0), STEP(c1, x1), STEP(c2, x2), STEP(c3, x3), STEP(c4, x4), STEP(c5, x5), STEP(c6, x6), STEP(c7, x7);
    }
    _mm256_storeu_ps(out, c0), _mm256_storeu_ps(out + 16, c1), _mm256_storeu_ps(out + 32, c2);
    _mm256_storeu_ps(out + 48, c3), _mm256_storeu_ps(out + 64, c4), _mm256_storeu_ps(out + 80, c5);
    _mm256_storeu_ps(out + 96, c6), _mm256_storeu_ps(out + 112, c7);
}

int agent_rt_small_gemm(const uint16_t *a, int64_t m, int64_t lda, const uint16_t *p, int64_t n, int64_t k,
                        const uint16_t *bias, uint16_t *c, int64_t ldc) {
    if (m < 1 || n % 16 || k % 32) return 1;
    float *x = malloc(sizeof(float) * (size_t)(m * k));
    if (!x) return 2;
    const int64_t k2 = k / 2, blocks = n / 16;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < k; j += 8)
                _mm256_storeu_ps(x + i * k + j, widen8(a + i * lda + j));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const uint32_t *w = (const uint32_t *)p + b * k2 * 16;
            __m256 bv[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            if (bias)
                for (int h = 0; h < 2; h++) bv[h] = widen8(bias + b * 16 + h * 8);
            for (int64_t r0 = 0; r0 < m;) {
                float out[HB * 16];
                int R = m - r0 < HB ? (int)(m - r0) : HB;
                if (R == HB) { /* 8 rows: each half of the block in one pass */
                    half_pass(x + r0 * k, k, w, k2, out);
                    half_pass(x + r0 * k, k, w + 8, k2, out + 8);
                } else { /* fewer: up to 4 rows a pass */
                    R = R < RB ? R : RB;
                    pass_any(x + r0 * k, k, w, k2, out, R);
                }
                for (int r = 0; r < R; r++)
                    for (int h = 0; h < 2; h++)
                        _mm_storeu_si128((__m128i *)(c + (r0 + r) * ldc + b * 16 + h * 8),
                                         to_bf16(_mm256_add_ps(_mm256_loadu_ps(out + r * 16 + h * 8), bv[h])));
                r0 += R;
            }
        }
    }
    free(x);
    return 0;
}

#else /* neither AMX nor AVX2 in this build */

int agent_rt_small_gemm_ready(void) { return 0; }

int agent_rt_gemm_max_rows(void) { return 0; }

int agent_rt_small_gemm(const uint16_t *a, int64_t m, int64_t lda, const uint16_t *p, int64_t n, int64_t k,
                        const uint16_t *bias, uint16_t *c, int64_t ldc) {
    (void)a, (void)m, (void)lda, (void)p, (void)n, (void)k, (void)bias, (void)c, (void)ldc;
    return 1;
}

#endif
