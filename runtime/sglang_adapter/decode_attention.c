/* Decode and extend attention over a paged bf16 KV pool for x86-64 CPUs with AVX-512 BF16, or
   with AVX2 and FMA on fp32 ("Decode attention on AVX2" and "Extend (prefill) attention" below).

   Built and loaded by runtime/sglang_adapter/native.py; called by cpu_attention.py once per layer
   for a whole decode batch. A step's batch is described as lists of KV slots, each attended by a
   set of query rows: a shared prefix is one list whose rows are all the requests that share it,
   and each request's own tokens are a list with one row. A row's output is the softmax over the
   union of the lists that contain it, merged by log-sum-exp. Nothing is gathered out of the pool:
   the kernel reads each slot's K and V rows where they are, prefetched a few blocks ahead.

   Work is split into tasks of (list, chunk of CHUNK keys); each computes, for each of its rows and
   query heads, the running max, the sum of exponentials and the weighted sum of V over its keys
   (online softmax over blocks of 16 keys), and the partials are merged per row at the end.
   q . k uses VDPBF16PS (bf16 products, fp32 sums), softmax and V sums are fp32, the output is
   rounded to bf16 (round to nearest even).

   Where the CPU has Intel AMX and the OS grants this process the tiles, lists attended by two rows
   or more (shared prefixes) and every extend compute their products on AMX tiles instead (see
   "on AMX tiles" below; agent_rt_attention_amx() turns that off for measurements). A list of one
   row (a request's own tokens) keeps the path above: it reads each key once for 1 row, which is
   what limits it, not the arithmetic. */

#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 256
#define BLOCK 16
#define ROWS_AT_ONCE 8 /* rows of a list attended in one pass over its keys (the AVX2 path shares the widened K and V) */

int agent_rt_abi_version(void) { return 6; }

/* fp32 -> bf16, round to nearest even (what VCVTNEPS2BF16 gives for normal numbers); NaN stays NaN */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* What follows is built for AVX-512 BF16, or else for AVX2 and FMA (decode and extend on either);
   what a build lacks is exported as functions that refuse every call (the end of this file). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define HAVE_DECODE 1
#define HAVE_EXTEND 1
#define EXTEND_FORM 1 /* the extend kernel on VDPBF16PS */

/* e^x for x <= 0 (lanes below -87 give about 1e-38). Cody-Waite reduction, degree-6 polynomial:
   about 1 ulp. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The 16 horizontal sums of v[0..15], in order, as one vector. */
static inline __m512 hsum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The lanes of keys j..j+15 that are below n */
static inline __mmask16 below(int64_t j, int64_t n) {
    return j + 16 <= n ? 0xFFFF : j >= n ? 0 : (__mmask16)((1u << (n - j)) - 1);
}

/* 16 bf16 -> 16 fp32 */
static inline __m512 widen(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 32 dims of two keys' rows as 32 bf16 pairs: dst[d] = (a[d], c[d]) for d < 32 (the layout of a
   dot product's second operand when keys are the reduced dimension) */
static inline void interleave32(__m512i a, __m512i c, uint32_t *dst) {
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo_idx, c));       /* dims 0..15 */
    _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(a, hi_idx, c));  /* dims 16..31 */
}

/* One query row's G heads of KV head h against keys slots[0..n): partial results into
   part[g] = {max, sum, acc[DIM]}. G and DIM are compile-time constants at each call site;
   first_row: this is the chunk's first row, whose pass over KV head 0 prefetches. */
static inline __attribute__((always_inline)) void attend_row(
    const uint16_t *q, const uint16_t *k_pool, const uint16_t *v_pool, int64_t slot_stride, int64_t h,
    const int32_t *slots, int64_t n, float scale, float *part, const int G, const int DIM, int first_row) {
    const int QV = DIM / 32, AV = DIM / 16;
    __m512bh qv[8][4];
    __m512 acc[8][8];
    float m[8], l[8];
    for (int g = 0; g < G; g++) {
        for (int i = 0; i < QV; i++) qv[g][i] = (__m512bh)_mm512_loadu_si512(q + g * DIM + i * 32);
        for (int i = 0; i < AV; i++) acc[g][i] = _mm512_setzero_ps();
        m[g] = -FLT_MAX;
        l[g] = 0;
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    float p[8][BLOCK] __attribute__((aligned(64)));
    for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
        int nb = n - b0 < BLOCK ? (int)(n - b0) : BLOCK;
        __mmask16 valid = (__mmask16)((1u << nb) - 1);
        const uint16_t *kr[BLOCK], *vr[BLOCK];
        for (int j = 0; j < BLOCK; j++) {
            int64_t s = slots[b0 + (j < nb ? j : nb - 1)];
            kr[j] = k_pool + s * slot_stride + h * DIM;
            vr[j] = v_pool + s * slot_stride + h * DIM;
        }
        if (b0 + BLOCK < n && h == 0 && first_row) {
            /* The first pass over the chunk (its first KV head, first row) pulls whole slot rows,
               every KV head's part, two blocks ahead; the passes for the other heads and rows
               find them in L2. (Written out here: as a helper function it measured slower.) */
            for (int j = BLOCK; j < 2 * BLOCK && b0 + BLOCK + j < n; j++) {
                int64_t t = slots[b0 + BLOCK + j];
                for (int64_t c = 0; c < slot_stride * 2; c += 64) {
                    _mm_prefetch((const char *)(k_pool + t * slot_stride) + c, _MM_HINT_T1);
                    _mm_prefetch((const char *)(v_pool + t * slot_stride) + c, _MM_HINT_T1);
                }
            }
        }
        for (int g = 0; g < G; g++) {
            __m512 t[BLOCK];
            for (int j = 0; j < BLOCK; j++) {
                __m512 d = _mm512_setzero_ps();
                for (int i = 0; i < QV; i++)
                    d = _mm512_dpbf16_ps(d, qv[g][i], (__m512bh)_mm512_loadu_si512(kr[j] + i * 32));
                t[j] = d;
            }
            __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_mul_ps(hsum16(t), vscale));
            float bm = _mm512_reduce_max_ps(s);
            if (bm > m[g]) {
                float alpha = expf(m[g] - bm);
                m[g] = bm;
                l[g] *= alpha;
                __m512 va = _mm512_set1_ps(alpha);
                for (int i = 0; i < AV; i++) acc[g][i] = _mm512_mul_ps(acc[g][i], va);
            }
            __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(s, _mm512_set1_ps(m[g]))));
            l[g] += _mm512_reduce_add_ps(e);
            _mm512_store_ps(p[g], e);
        }
        for (int j = 0; j < nb; j++) {
            __m512 v[8];
            for (int i = 0; i < AV; i++) v[i] = widen(vr[j] + i * 16);
            for (int g = 0; g < G; g++) {
                __m512 w = _mm512_set1_ps(p[g][j]);
                for (int i = 0; i < AV; i++) acc[g][i] = _mm512_fmadd_ps(w, v[i], acc[g][i]);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float *u = part + g * (DIM + 2);
        u[0] = m[g];
        u[1] = l[g];
        for (int i = 0; i < AV; i++) _mm512_storeu_ps(u + 2 + i * 16, acc[g][i]);
    }
}

/* R rows one after the other (qs[r]: row r's G query heads; its partials at part + r * rstride);
   the first of a list's rows prefetches */
static inline __attribute__((always_inline)) void attend_rows(
    const uint16_t *const *qs, int R, const uint16_t *k_pool, const uint16_t *v_pool, int64_t slot_stride, int64_t h,
    const int32_t *slots, int64_t n, float scale, float *part, int64_t rstride, const int G, const int DIM, int first_row) {
    for (int r = 0; r < R; r++)
        attend_row(qs[r], k_pool, v_pool, slot_stride, h, slots, n, scale, part + r * rstride, G, DIM, first_row && r == 0);
}

/* ---- Decode attention on AMX tiles --------------------------------------------------------------

   Where the CPU has AMX and the OS grants this process the tile state (the same test as
   small_gemm.c's), a task of a list with two rows or more computes all query vectors of up to
   32 / G of its rows for one KV head at once (one or two tiles of 16), over its chunk of keys, in
   two passes instead of an online softmax:
   - S = Q K^T per block of 16 keys on TDPBF16PS: Q is the rows' query vectors (zero-padded), K^T
     is the 16 keys' rows transposed as dim pairs x keys (the tiles' second-operand layout), fp32
     sums as VDPBF16PS makes them;
   - each query vector's max, exponentials and sum over the chunk in fp32 (as attend_row);
   - O = P V: V is interleaved as key pairs x D, and P, fp32, is split into two bf16 parts
     (hi = bf16(p), lo = bf16(p - hi)) multiplied one after the other into the same fp32
     accumulators, so the products carry about 16 bits of p, not bf16's 8: as accurate as
     attend_row, which widens V and multiplies by p in fp32.
   The partials (max, sum, unnormalized acc) are attend_row's and merge the same way. attend_row
   spends about a dozen instructions per query vector and key, two of them VDPBF16PS (slow on some
   hosts: docs/BENCHMARKS.md, "sixth round"); here the tile products cost almost nothing, the
   transposes and the softmax are per key or per query vector and block, and a prefix attended by
   8 rows costs about 1.6x one attended by 4 instead of 2x ("seventh round"). */

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
int agent_rt_small_gemm_ready(void); /* small_gemm.c: the OS granted this process the tiles */
static int use_amx = 1;

static int tiles_on(void) { return use_amx && agent_rt_small_gemm_ready(); }

static void amx_configure(void) {
    /* every tile 16 rows x 64 bytes: 0-3 O (16 x 16 fp32), 4 and 7 S, 5 the first operand, 6 the second */
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

static void amx_release(void) { _tile_release(); }

/* The P V accumulators, tiles 0-3 (16 x 64 fp32; tile numbers must be constants, hence written out) */
static inline void zero_o_tiles(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

static inline void store_o_tiles(float *o, int64_t stride_bytes) {
    _tile_stored(0, o, stride_bytes);
    _tile_stored(1, o + 16, stride_bytes);
    _tile_stored(2, o + 32, stride_bytes);
    _tile_stored(3, o + 48, stride_bytes);
}

/* Tiles 0-3 += P V for 16 query vectors: P at p (16 rows of 32 keys, bf16, rows p_stride bytes
   apart), against 64 dims of 32 keys of V as key pairs at vb (rows D pairs apart) */
static inline void add_pv_tiles(const void *p, int64_t p_stride, const uint32_t *vb, int D) {
    _tile_loadd(5, p, p_stride);
    _tile_loadd(6, vb, D * 4);
    _tile_dpbf16ps(0, 5, 6);
    _tile_loadd(6, vb + 16, D * 4);
    _tile_dpbf16ps(1, 5, 6);
    _tile_loadd(6, vb + 32, D * 4);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(6, vb + 48, D * 4);
    _tile_dpbf16ps(3, 5, 6);
}

/* r[i][j] <- r[j][i] for a 16 x 16 matrix of 32-bit elements */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* Rows rows[0..nrows) of the batch (their G query vectors of KV head h: M = nrows * G <= 32, in
   one or two tiles of 16) against keys slots[0..n), n <= CHUNK: partials into part, row r's G
   heads at part + r * rstride (units as in attend_row). */
static void attend_rows_amx(const uint16_t *q, int64_t q_stride, const int32_t *rows, int nrows, int G, int D,
                            const uint16_t *k_pool, const uint16_t *v_pool, int64_t slot_stride, int64_t h,
                            const int32_t *slots, int64_t n, float scale, float *part, int64_t rstride) {
    const int M = nrows * G, MT = (M + 15) / 16, DP = D / 2, nblk = (int)((n + 15) / 16);
    const int n32 = (int)((n + 31) / 32) * 32;
    uint16_t qb[32 * 128] __attribute__((aligned(64)));          /* [32][D] */
    uint32_t kt[64 * 16] __attribute__((aligned(64)));           /* [D/2][16 keys] */
    uint32_t vv[CHUNK / 2 * 128] __attribute__((aligned(64)));   /* [key pairs][D] */
    float s[32 * CHUNK] __attribute__((aligned(64)));            /* [32][CHUNK] */
    uint16_t ph[32 * CHUNK] __attribute__((aligned(64)));        /* P, bf16 high part */
    uint16_t pl[32 * CHUNK] __attribute__((aligned(64)));        /* P, bf16 low part */
    float o[32 * 128] __attribute__((aligned(64)));              /* [32][D] */
    memset(qb, 0, sizeof(uint16_t) * 16 * MT * D);
    for (int r = 0; r < nrows; r++)
        memcpy(qb + r * G * D, q + rows[r] * q_stride + h * G * D, sizeof(uint16_t) * G * D);
    for (int b = 0; b < nblk; b++) {
        /* K^T for the 16 keys (past n, the last key again): 16 x 16 transposes of 32-bit dim pairs */
        const uint32_t *kr[16];
        for (int j = 0; j < 16; j++) {
            int64_t t = (int64_t)b * 16 + j;
            kr[j] = (const uint32_t *)(k_pool + (int64_t)slots[t < n ? t : n - 1] * slot_stride + h * D);
        }
        for (int p0 = 0; p0 < DP; p0 += 16) {
            __m512i r[16];
            for (int j = 0; j < 16; j++) r[j] = _mm512_loadu_si512(kr[j] + p0);
            transpose16(r);
            for (int p = 0; p < 16; p++) _mm512_store_si512(kt + (p0 + p) * 16, r[p]);
        }
        for (int mt = 0; mt < MT; mt++) {
            _tile_zero(4);
            for (int d0 = 0; d0 < D; d0 += 32) {
                _tile_loadd(5, qb + mt * 16 * D + d0, D * 2);
                _tile_loadd(6, kt + d0 / 2 * 16, 64);
                _tile_dpbf16ps(4, 5, 6);
            }
            _tile_stored(4, s + mt * 16 * CHUNK + b * 16, CHUNK * 4);
        }
    }
    /* V as key pairs: vv[t][d] = (V[2t][d], V[2t + 1][d]); past n, the last key (its p is 0) */
    for (int t = 0; t < n32; t += 2) {
        const uint16_t *a = v_pool + (int64_t)slots[t < n ? t : n - 1] * slot_stride + h * D;
        const uint16_t *c = v_pool + (int64_t)slots[t + 1 < n ? t + 1 : n - 1] * slot_stride + h * D;
        for (int d = 0; d < D; d += 32)
            interleave32(_mm512_loadu_si512(a + d), _mm512_loadu_si512(c + d), vv + (t / 2) * D + d);
    }
    /* softmax per query vector over the chunk; P split into bf16 hi + lo, zero past n */
    const __m512 vscale = _mm512_set1_ps(scale);
    float m[32], l[32];
    for (int i = 0; i < 16 * MT; i++) {
        if (i >= M) {
            memset(ph + i * CHUNK, 0, sizeof(uint16_t) * n32);
            memset(pl + i * CHUNK, 0, sizeof(uint16_t) * n32);
            continue;
        }
        float *si = s + i * CHUNK;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < n32; j += 16) {
            __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), below(j, n), _mm512_mul_ps(_mm512_load_ps(si + j), vscale));
            _mm512_store_ps(si + j, x);
            mx = _mm512_max_ps(mx, x);
        }
        float mi = _mm512_reduce_max_ps(mx);
        __m512 vm = _mm512_set1_ps(mi), sum = _mm512_setzero_ps();
        for (int j = 0; j < n32; j += 32) {
            __m512 e0 = exp512(_mm512_sub_ps(_mm512_load_ps(si + j), vm));
            __m512 e1 = exp512(_mm512_sub_ps(_mm512_load_ps(si + j + 16), vm));
            e0 = _mm512_maskz_mov_ps(below(j, n), e0);
            e1 = _mm512_maskz_mov_ps(below(j + 16, n), e1);
            sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
            __m512bh hi = _mm512_cvtne2ps_pbh(e1, e0);
            __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256((__m512i)hi)), 16));
            __m512 h1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64((__m512i)hi, 1)), 16));
            _mm512_store_si512(ph + i * CHUNK + j, (__m512i)hi);
            _mm512_store_si512(pl + i * CHUNK + j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(e1, h1), _mm512_sub_ps(e0, h0)));
        }
        m[i] = mi;
        l[i] = _mm512_reduce_add_ps(sum);
    }
    /* O = P V, 64 dims (4 accumulator tiles) at a time */
    for (int mt = 0; mt < MT; mt++)
        for (int dh = 0; dh < D; dh += 64) {
            zero_o_tiles();
            for (int kb = 0; kb < n32; kb += 32) {  /* P's high, then its low bf16 part */
                add_pv_tiles(ph + mt * 16 * CHUNK + kb, CHUNK * 2, vv + (kb / 2) * D + dh, D);
                add_pv_tiles(pl + mt * 16 * CHUNK + kb, CHUNK * 2, vv + (kb / 2) * D + dh, D);
            }
            store_o_tiles(o + mt * 16 * D + dh, D * 4);
        }
    for (int r = 0; r < nrows; r++)
        for (int g = 0; g < G; g++) {
            const int i = r * G + g;
            float *u = part + r * rstride + g * (D + 2);
            u[0] = m[i];
            u[1] = l[i];
            memcpy(u + 2, o + i * D, sizeof(float) * D);
        }
}

/* Extend: S[i][j] = q_i . k_j for 48 query vectors qp ([48][D/2] dim pairs) and one block of 32 keys
   packed as kb ([D/2][32] dim pairs), into s ([48][32] fp32, not scaled). */
static void extend_scores_amx(const uint32_t *qp, const uint32_t *kb, float *s, int D) {
    const int DP = D / 2;
    for (int mt = 0; mt < 3; mt++) {
        _tile_zero(4);
        _tile_zero(7);
        for (int p0 = 0; p0 < DP; p0 += 16) {
            _tile_loadd(5, qp + mt * 16 * DP + p0, DP * 4);
            _tile_loadd(6, kb + p0 * 32, 128);
            _tile_dpbf16ps(4, 5, 6);
            _tile_loadd(6, kb + p0 * 32 + 16, 128);
            _tile_dpbf16ps(7, 5, 6);
        }
        _tile_stored(4, s + mt * 16 * 32, 128);
        _tile_stored(7, s + mt * 16 * 32 + 16, 128);
    }
}

/* Extend: t = P V for the 16 query vectors pp ([16][16] key pairs, bf16) and dims dh..dh+63 of one
   block's V packed as vb ([16 key pairs][D]), into t ([16][64] fp32). */
static void extend_pv_amx(const uint32_t *pp, const uint32_t *vb, int dh, int D, float *t) {
    zero_o_tiles();
    add_pv_tiles(pp, 64, vb + dh, D);
    store_o_tiles(t, 256);
}
#else
static void extend_scores_amx(const uint32_t *qp, const uint32_t *kb, float *s, int D) {
    (void)qp, (void)kb, (void)s, (void)D;
}
static void extend_pv_amx(const uint32_t *pp, const uint32_t *vb, int dh, int D, float *t) {
    (void)pp, (void)vb, (void)dh, (void)D, (void)t;
}
#endif

#elif defined(__AVX2__) && defined(__FMA__)
#define HAVE_DECODE 1
#define HAVE_EXTEND 1
#define EXTEND_FORM 2 /* the extend kernel on fp32 FMAs */

/* ---- Decode attention on AVX2 ---------------------------------------------------------------------

   For x86-64 CPUs with AVX2 and FMA but no AVX-512 BF16 (no bf16 dot products): the same tasks,
   partials and merge, up to ROWS_AT_ONCE rows of a list per pass. Per block of 8 keys the K and V
   rows are widened to fp32 once (a shift of each bf16) into a small buffer, for all the pass's
   rows, then per row and query head: the 8 scores as 8 fp32 dot products summed across lanes
   together, the online softmax, and the 8 keys' V rows added into the head's fp32 accumulators.
   Prefetching as above. The extend kernel has an fp32 form for these CPUs too (see "Extend
   (prefill) attention" below). */

/* e^x for x <= 0 (lanes below -87 give about 1e-38), as exp512 */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* The 8 horizontal sums of t[0..7], in order, as one vector. */
static inline __m256 hsum8(const __m256 *t) {
    __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
    __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(t[4], t[5]), _mm256_hadd_ps(t[6], t[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

static inline float hadd8(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
}

/* 8 bf16 -> 8 fp32 */
static inline __m256 widen8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* As the AVX-512 attend_row, for R rows at once (qs[r]: row r's G query heads of KV head h; its
   partials at part + r * rstride): each block's K and V rows are widened once for all of them, so
   the rows of a shared prefix share that work and the reads. */
static inline __attribute__((always_inline)) void attend_rows(
    const uint16_t *const *qs, int R, const uint16_t *k_pool, const uint16_t *v_pool, int64_t slot_stride, int64_t h,
    const int32_t *slots, int64_t n, float scale, float *part, int64_t rstride, const int G, const int DIM, int first_row) {
    enum { KB8 = 8 };
    const int DV = DIM / 8;
    float qf[ROWS_AT_ONCE * 8][128] __attribute__((aligned(32))), kf[KB8][128] __attribute__((aligned(32)));
    float vf[KB8][128] __attribute__((aligned(32))), p[KB8] __attribute__((aligned(32)));
    float m[ROWS_AT_ONCE * 8], l[ROWS_AT_ONCE * 8];
    for (int x = 0; x < R * G; x++) {
        const int r = x / G, g = x % G;
        for (int i = 0; i < DV; i++) _mm256_store_ps(qf[x] + 8 * i, _mm256_mul_ps(widen8(qs[r] + g * DIM + 8 * i), _mm256_set1_ps(scale)));
        for (int i = 0; i < DV; i++) _mm256_storeu_ps(part + r * rstride + g * (DIM + 2) + 2 + 8 * i, _mm256_setzero_ps());
        m[x] = -FLT_MAX;
        l[x] = 0;
    }
    for (int64_t b0 = 0; b0 < n; b0 += KB8) {
        const int nb = n - b0 < KB8 ? (int)(n - b0) : KB8;
        if (b0 + 2 * BLOCK < n && h == 0 && first_row && b0 % BLOCK == 0)
            for (int j = BLOCK; j < 2 * BLOCK && b0 + BLOCK + j < n; j++) {
                int64_t t = slots[b0 + BLOCK + j];
                for (int64_t c = 0; c < slot_stride * 2; c += 64) {
                    _mm_prefetch((const char *)(k_pool + t * slot_stride) + c, _MM_HINT_T1);
                    _mm_prefetch((const char *)(v_pool + t * slot_stride) + c, _MM_HINT_T1);
                }
            }
        for (int j = 0; j < KB8; j++) {
            int64_t s = slots[b0 + (j < nb ? j : nb - 1)];
            const uint16_t *kr = k_pool + s * slot_stride + h * DIM, *vr = v_pool + s * slot_stride + h * DIM;
            for (int i = 0; i < DV; i++) {
                _mm256_store_ps(kf[j] + 8 * i, widen8(kr + 8 * i));
                _mm256_store_ps(vf[j] + 8 * i, widen8(vr + 8 * i));
            }
        }
        const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(nb), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
        for (int x = 0; x < R * G; x++) {
            __m256 t[KB8];
            for (int j = 0; j < KB8; j++) {
                __m256 d = _mm256_mul_ps(_mm256_load_ps(qf[x]), _mm256_load_ps(kf[j]));
                for (int i = 1; i < DV; i++) d = _mm256_fmadd_ps(_mm256_load_ps(qf[x] + 8 * i), _mm256_load_ps(kf[j] + 8 * i), d);
                t[j] = d;
            }
            __m256 sc = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), hsum8(t), valid);
            float *acc = part + (x / G) * rstride + (x % G) * (DIM + 2) + 2;
            float bm = hmax8(sc);
            if (bm > m[x]) {
                float alpha = expf(m[x] - bm);
                m[x] = bm;
                l[x] *= alpha;
                for (int i = 0; i < DV; i++) _mm256_storeu_ps(acc + 8 * i, _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * i), _mm256_set1_ps(alpha)));
            }
            __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(sc, _mm256_set1_ps(m[x]))), valid);
            l[x] += hadd8(e);
            _mm256_store_ps(p, e);
            for (int i = 0; i < DV; i++) {
                __m256 a = _mm256_loadu_ps(acc + 8 * i);
                for (int j = 0; j < nb; j++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_load_ps(vf[j] + 8 * i), a);
                _mm256_storeu_ps(acc + 8 * i, a);
            }
        }
    }
    for (int x = 0; x < R * G; x++) {
        part[(x / G) * rstride + (x % G) * (DIM + 2)] = m[x];
        part[(x / G) * rstride + (x % G) * (DIM + 2) + 1] = l[x];
    }
}

#endif

#ifdef HAVE_DECODE

#define ROW_CASE(GG, DD)                                                                               \
    if (G == GG && D == DD) {                                                                          \
        attend_rows(qs, R, k_pool, v_pool, slot_stride, h, slots, n, scale, part, rstride, GG, DD, first_row); \
        return;                                                                                        \
    }

/* Rows qs[0..R) of one list (at most ROWS_AT_ONCE) against its keys slots[0..n), KV head h */
static void attend_rows_any(const uint16_t *const *qs, int R, const uint16_t *k_pool, const uint16_t *v_pool,
                            int64_t slot_stride, int64_t h, const int32_t *slots, int64_t n, float scale, float *part,
                            int64_t rstride, int G, int D, int first_row) {
    ROW_CASE(1, 64) ROW_CASE(2, 64) ROW_CASE(3, 64) ROW_CASE(4, 64)
    ROW_CASE(5, 64) ROW_CASE(6, 64) ROW_CASE(7, 64) ROW_CASE(8, 64)
    ROW_CASE(1, 128) ROW_CASE(2, 128) ROW_CASE(3, 128) ROW_CASE(4, 128)
    ROW_CASE(5, 128) ROW_CASE(6, 128) ROW_CASE(7, 128) ROW_CASE(8, 128)
}

#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__) || !defined(HAVE_EXTEND)
static int tiles_on(void) { return 0; }
static void amx_configure(void) {}
static void amx_release(void) {}
static void attend_rows_amx(const uint16_t *q, int64_t q_stride, const int32_t *rows, int nrows, int G, int D,
                            const uint16_t *k_pool, const uint16_t *v_pool, int64_t slot_stride, int64_t h,
                            const int32_t *slots, int64_t n, float scale, float *part, int64_t rstride) {
    (void)q, (void)q_stride, (void)rows, (void)nrows, (void)G, (void)D, (void)k_pool, (void)v_pool;
    (void)slot_stride, (void)h, (void)slots, (void)n, (void)scale, (void)part, (void)rstride;
}
#endif

/* Whether attention (decode and extend) uses AMX tiles where it can (want: 1 yes, 0 no; -1 only
   asks): returns 1 when it does from now on. */
int agent_rt_attention_amx(int want) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (want >= 0) use_amx = want;
#else
    (void)want;
#endif
    return tiles_on();
}

int agent_rt_supports(int64_t G, int64_t D) { return G >= 1 && G <= 8 && (D == 64 || D == 128); }

/* q: bf16 [rows of the batch, H * G, D] with row stride q_stride (elements); k_pool, v_pool: bf16
   [slots, H, D] with slot stride slot_stride; lists l = 0..L-1: keys slots[key_start[l] ..
   key_start[l + 1]), rows rows[row_start[l] .. row_start[l + 1]) (batch indices); out: bf16
   [batch rows, H * G, D] with row stride out_stride. Every batch row must be in some list with
   keys. Returns 0, or -1 when out of memory (nothing written). */
int agent_rt_decode_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k_pool, const uint16_t *v_pool,
                              int64_t slot_stride, const int32_t *slots, const int64_t *key_start,
                              const int32_t *rows, const int64_t *row_start, int64_t L, int64_t batch, int64_t H,
                              int64_t G, int64_t D, float scale, uint16_t *out, int64_t out_stride) {
    int64_t tasks = 0, units = 0;
    for (int64_t l = 0; l < L; l++) tasks += (key_start[l + 1] - key_start[l] + CHUNK - 1) / CHUNK;
    int64_t *task = malloc(sizeof(int64_t) * (3 * tasks + 1));
    if (!task) return -1;
    int64_t t = 0;
    for (int64_t l = 0; l < L; l++) {
        int64_t n = key_start[l + 1] - key_start[l], nr = row_start[l + 1] - row_start[l];
        for (int64_t c = 0; c * CHUNK < n; c++, t++) {
            task[3 * t] = l;
            task[3 * t + 1] = c;
            task[3 * t + 2] = units;  /* where its partials start, in units of D + 2 floats */
            units += nr * H * G;
        }
    }
    float *part = malloc(sizeof(float) * (units ? units : 1) * (D + 2));
    if (!part) { free(task); return -1; }
    const int amx = tiles_on();
#pragma omp parallel
    {
        if (amx) amx_configure();
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < tasks; i++) {
            int64_t l = task[3 * i], c = task[3 * i + 1];
            int64_t k0 = key_start[l] + c * CHUNK, k1 = k0 + CHUNK < key_start[l + 1] ? k0 + CHUNK : key_start[l + 1];
            int64_t nr = row_start[l + 1] - row_start[l];
            float *u = part + task[3 * i + 2] * (D + 2);
            if (amx && nr > 1) {
                /* all query vectors of up to 32 / G rows at once, per KV head */
                const int64_t per = 32 / G;
                for (int64_t h = 0; h < H; h++)
                    for (int64_t r0 = 0; r0 < nr; r0 += per)
                        attend_rows_amx(q, q_stride, rows + row_start[l] + r0, nr - r0 < per ? (int)(nr - r0) : (int)per,
                                        (int)G, (int)D, k_pool, v_pool, slot_stride, h, slots + k0, k1 - k0, scale,
                                        u + (r0 * H + h) * G * (D + 2), H * G * (D + 2));
                continue;
            }
            for (int64_t h = 0; h < H; h++)
                for (int64_t r0 = 0; r0 < nr; r0 += ROWS_AT_ONCE) {
                    const uint16_t *qs[ROWS_AT_ONCE];
                    const int R = nr - r0 < ROWS_AT_ONCE ? (int)(nr - r0) : ROWS_AT_ONCE;
                    for (int r = 0; r < R; r++) qs[r] = q + rows[row_start[l] + r0 + r] * q_stride + h * G * D;
                    attend_rows_any(qs, R, k_pool, v_pool, slot_stride, h, slots + k0, k1 - k0, scale,
                                    u + (r0 * H + h) * G * (D + 2), H * G * (D + 2), (int)G, (int)D, r0 == 0);
                }
        }
        if (amx) amx_release();
    }
    /* merge: per batch row and query head, the running (max, sum, acc) over every partial */
    int64_t heads = H * G;
    float *state = calloc((size_t)(batch * heads * (D + 2)), sizeof(float));
    if (!state) { free(part); free(task); return -1; }
    for (int64_t x = 0; x < batch * heads; x++) state[x * (D + 2)] = -FLT_MAX;
    for (int64_t i = 0; i < tasks; i++) {
        int64_t l = task[3 * i], nr = row_start[l + 1] - row_start[l];
        const float *u = part + task[3 * i + 2] * (D + 2);
        for (int64_t r = 0; r < nr; r++)
            for (int64_t hq = 0; hq < heads; hq++) {
                const float *src = u + (r * heads + hq) * (D + 2);
                float *dst = state + (rows[row_start[l] + r] * heads + hq) * (D + 2);
                if (src[1] == 0) continue;
                float mx = src[0] > dst[0] ? src[0] : dst[0], a = expf(dst[0] - mx), b = expf(src[0] - mx);
                dst[0] = mx;
                dst[1] = dst[1] * a + src[1] * b;
                for (int64_t d = 0; d < D; d++) dst[2 + d] = dst[2 + d] * a + src[2 + d] * b;
            }
    }
    for (int64_t r = 0; r < batch; r++)
        for (int64_t hq = 0; hq < heads; hq++) {
            const float *s = state + (r * heads + hq) * (D + 2);
            float inv = s[1] > 0 ? 1.0f / s[1] : 0.0f;
            uint16_t *o = out + r * out_stride + hq * D;
            for (int64_t d = 0; d < D; d++) o[d] = bf16_round(s[2 + d] * inv);
        }
    free(state);
    free(part);
    free(task);
    return 0;
}


#endif /* HAVE_DECODE */

#ifdef HAVE_EXTEND

/* ---- Extend (prefill) attention ----------------------------------------------------------------

   The new rows of each request of an extend batch, each attending its context's keys up to its own
   position (causal). Per (request, KV head), K and V are first packed out of the pool in blocks of
   32 keys, once for all the request's new rows. Then each task takes a tile of query rows (their G
   heads of one KV head: 48 query vectors, padded) and walks the key blocks from position 0: S =
   Q K^T for the block, scaled and masked past each row's position, online softmax in fp32, and
   P V for the block added to the row's fp32 output. Blocks are aligned at absolute positions and a
   block a row cannot see leaves it exactly as it was, so a row's result depends only on its query
   and the keys up to its position: not on how much of the prompt was cached, nor on the rest of
   the batch.

   With AVX-512 BF16, K is packed as [D/2 dim pairs][32 keys] and V as [key pair][D] (each 32-bit
   lane two keys' bf16 values of one dim), the layouts VDPBF16PS takes as its second operand; S
   is 12 query vectors x 32 keys per register tile, the probabilities are rounded to bf16 (as
   PyTorch's CPU flash attention does) for P V. With AMX tiles, S for the block is 3 x 2 tiles of
   16 x 16 (the packed K is already the tiles' second-operand layout) and P V is 16 query vectors
   x 64 dims per 4 tiles, the same packed V as second operand; the softmax, the rescaling and the
   rounding stay as described.

   With AVX2 and FMA only, K and V are widened to fp32 as they are packed (K as [D][32 keys], V as
   [32 keys][D]), the queries once per task (scaled); S is 6 query vectors x 16 keys of fp32 FMAs
   per register tile, P V 6 query vectors x 16 dims (each load of K or V shared by 6 FMAs), and the
   probabilities stay fp32. */

#define KB 32  /* keys per block */
#define QT 48  /* query vectors per task (padded) */

#if EXTEND_FORM == 1
typedef uint32_t ext_word;                    /* two bf16 */
#define EXT_WORDS(D) ((int64_t)(KB / 2) * (D)) /* per block and KV head, of K and of V each */

/* Pack one KV head's K and V for keys slots[0..T) into kp ([ceil(T/32)][D/2][32] uint32) and
   vp ([ceil(T/2)][D] uint32); keys past T are zeros. */
static void pack_kv_block(const uint16_t *k_pool, const uint16_t *v_pool, int64_t slot_stride, int64_t h, int D,
                          const int32_t *slots, int64_t T, int64_t b, uint32_t *kp, uint32_t *vp) {
    const int DP = D / 2;
    uint32_t *kb = kp + b * DP * KB;
    for (int j = 0; j < KB; j++) {
        int64_t t = b * KB + j;
        if (t < T) {
            const uint32_t *row = (const uint32_t *)(k_pool + (int64_t)slots[t] * slot_stride + h * D);
            for (int p = 0; p < DP; p++) kb[p * KB + j] = row[p];
        } else {
            for (int p = 0; p < DP; p++) kb[p * KB + j] = 0;
        }
    }
    for (int j = 0; j < KB; j += 2) {
        int64_t t = b * KB + j;
        uint32_t *dst = vp + (t / 2) * D;
        for (int d = 0; d < D; d += 32) {
            __m512i a = t < T ? _mm512_loadu_si512(v_pool + (int64_t)slots[t] * slot_stride + h * D + d) : _mm512_setzero_si512();
            __m512i c = t + 1 < T ? _mm512_loadu_si512(v_pool + (int64_t)slots[t + 1] * slot_stride + h * D + d) : _mm512_setzero_si512();
            interleave32(a, c, dst + d);
        }
    }
}

/* One task: query vectors qp[QT][D/2] (pairs), positions pos[QT] (-1: padding), over key blocks
   0..nblocks of one packed head; writes o[QT][D] (fp32, normalized). */
static inline __attribute__((always_inline)) void extend_tile(const uint32_t *qp, const int64_t *pos, const uint32_t *kp,
                                                              const uint32_t *vp, int64_t nblocks, float scale, float *o,
                                                              const int D, const int amx) {
    const int DP = D / 2, DV = D / 16, PT = D == 64 ? 6 : 3;
    float m[QT], l[QT], s[QT][KB] __attribute__((aligned(64)));
    uint32_t pp[QT][KB / 2] __attribute__((aligned(64)));
    float alpha[QT];
    int live[QT];
    for (int i = 0; i < QT; i++) { m[i] = -INFINITY; l[i] = 0; }
    memset(o, 0, sizeof(float) * QT * D);
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t b = 0; b < nblocks; b++) {
        const uint32_t *kb = kp + b * DP * KB;
        /* S = Q K^T: on AMX tiles, or 12 query vectors x 32 keys at a time */
        if (amx) extend_scores_amx(qp, kb, &s[0][0], D);
        else
        for (int i0 = 0; i0 < QT; i0 += 12) {
            __m512 acc[12][2];
            for (int i = 0; i < 12; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
            for (int p = 0; p < DP; p++) {
                __m512bh k0 = (__m512bh)_mm512_loadu_si512(kb + p * KB), k1 = (__m512bh)_mm512_loadu_si512(kb + p * KB + 16);
                for (int i = 0; i < 12; i++) {
                    __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qp[(i0 + i) * DP + p]);
                    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], qb, k0);
                    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], qb, k1);
                }
            }
            for (int i = 0; i < 12; i++) {
                _mm512_store_ps(s[i0 + i], acc[i][0]);
                _mm512_store_ps(s[i0 + i] + 16, acc[i][1]);
            }
        }
        /* mask past each row's position, online softmax, P as bf16 pairs */
        for (int i = 0; i < QT; i++) {
            int64_t seen = pos[i] - b * KB + 1;  /* keys of this block the row sees */
            live[i] = seen > 0;
            if (!live[i]) continue;
            __mmask16 m0 = seen >= 16 ? 0xFFFF : (__mmask16)((1u << seen) - 1);
            __mmask16 m1 = seen >= 32 ? 0xFFFF : seen <= 16 ? 0 : (__mmask16)((1u << (seen - 16)) - 1);
            __m512 s0 = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m0, _mm512_mul_ps(_mm512_load_ps(s[i]), vscale));
            __m512 s1 = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m1, _mm512_mul_ps(_mm512_load_ps(s[i] + 16), vscale));
            float bm = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
            float mn = bm > m[i] ? bm : m[i];
            alpha[i] = expf(m[i] - mn);  /* 0 on the row's first block (m = -inf) */
            m[i] = mn;
            __m512 e0 = _mm512_maskz_mov_ps(m0, exp512(_mm512_sub_ps(s0, _mm512_set1_ps(mn))));
            __m512 e1 = _mm512_maskz_mov_ps(m1, exp512(_mm512_sub_ps(s1, _mm512_set1_ps(mn))));
            l[i] = l[i] * alpha[i] + _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
            _mm512_store_si512(pp[i], (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
        /* O = O * alpha + P V: on AMX tiles (16 query vectors x 64 dims), or PT query vectors x D dims
           at a time */
        const uint32_t *vb = vp + b * (KB / 2) * D;
        if (amx) {
            float t[16 * 64] __attribute__((aligned(64)));
            for (int i0 = 0; i0 < QT; i0 += 16)
                for (int dh = 0; dh < D; dh += 64) {
                    extend_pv_amx(pp[i0], vb, dh, D, t);
                    for (int i = 0; i < 16; i++) {
                        if (!live[i0 + i]) continue;
                        float *oi = o + (int64_t)(i0 + i) * D + dh;
                        __m512 a = _mm512_set1_ps(alpha[i0 + i]);
                        for (int c = 0; c < 4; c++)
                            _mm512_storeu_ps(oi + c * 16, _mm512_fmadd_ps(_mm512_loadu_ps(oi + c * 16), a,
                                                                          _mm512_load_ps(t + i * 64 + c * 16)));
                    }
                }
        } else
        for (int i0 = 0; i0 < QT; i0 += PT) {
            __m512 acc[6][8];
            for (int i = 0; i < PT; i++)
                for (int c = 0; c < DV; c++) acc[i][c] = _mm512_setzero_ps();
            for (int t = 0; t < KB / 2; t++) {
                __m512bh v[8];
                for (int c = 0; c < DV; c++) v[c] = (__m512bh)_mm512_loadu_si512(vb + t * D + c * 16);
                for (int i = 0; i < PT; i++) {
                    __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pp[i0 + i][t]);
                    for (int c = 0; c < DV; c++) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], pb, v[c]);
                }
            }
            for (int i = 0; i < PT; i++) {
                if (!live[i0 + i]) continue;  /* a block the row cannot see leaves it as it was */
                float *oi = o + (int64_t)(i0 + i) * D;
                __m512 a = _mm512_set1_ps(alpha[i0 + i]);
                for (int c = 0; c < DV; c++)
                    _mm512_storeu_ps(oi + c * 16, _mm512_fmadd_ps(_mm512_loadu_ps(oi + c * 16), a, acc[i][c]));
            }
        }
    }
    for (int i = 0; i < QT; i++) {
        float inv = l[i] > 0 ? 1.0f / l[i] : 0.0f;
        for (int c = 0; c < DV; c++)
            _mm512_storeu_ps(o + i * D + c * 16, _mm512_mul_ps(_mm512_loadu_ps(o + i * D + c * 16), _mm512_set1_ps(inv)));
    }
}


/* One task: the queries of rows row0 .. row0 + rows (positions pos0 ..) of KV head h, against
   the request's packed K and V; their outputs into out. */
static void extend_task(const uint16_t *q, int64_t q_stride, int64_t row0, int64_t rows, int64_t pos0, int64_t h,
                        int64_t G, int64_t D, const ext_word *kp, const ext_word *vp, float scale, uint16_t *out,
                        int64_t out_stride, int amx) {
    uint32_t qp[QT * 64] __attribute__((aligned(64)));
    int64_t pos[QT];
    float o[QT * 128] __attribute__((aligned(64)));
    int DP = (int)D / 2;
    memset(qp, 0, sizeof(uint32_t) * QT * DP);
    for (int64_t x = 0; x < QT; x++) pos[x] = -1;
    for (int64_t x = 0; x < rows; x++)
        for (int64_t g = 0; g < G; g++) {
            memcpy(qp + (x * G + g) * DP, q + (row0 + x) * q_stride + (h * G + g) * D, sizeof(uint16_t) * D);
            pos[x * G + g] = pos0 + x;
        }
    int64_t nblocks = (pos0 + rows - 1) / KB + 1;
    if (D == 64) extend_tile(qp, pos, kp, vp, nblocks, scale, o, 64, amx);
    else extend_tile(qp, pos, kp, vp, nblocks, scale, o, 128, amx);
    for (int64_t x = 0; x < rows; x++)
        for (int64_t g = 0; g < G; g++) {
            uint16_t *dst = out + (row0 + x) * out_stride + (h * G + g) * D;
            const float *src = o + (x * G + g) * D;
            for (int64_t d = 0; d < D; d += 16)
                _mm256_storeu_si256((__m256i *)(dst + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + d)));
        }
}

#else /* AVX2 and FMA */
typedef float ext_word;
#define EXT_WORDS(D) ((int64_t)KB * (D)) /* per block and KV head, of K and of V each */

/* r[0..8) as the rows of an 8 x 8 matrix -> its columns */
static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* Pack block b of one KV head's K and V for keys slots[0..T), widened to fp32, into kp ([D][32]
   per block) and vp ([32][D] per block); keys past T are zeros. */
static void pack_kv_block(const uint16_t *k_pool, const uint16_t *v_pool, int64_t slot_stride, int64_t h, int D,
                          const int32_t *slots, int64_t T, int64_t b, float *kp, float *vp) {
    float *kb = kp + b * KB * D, *vb = vp + b * KB * D;
    for (int j0 = 0; j0 < KB; j0 += 8)
        for (int d0 = 0; d0 < D; d0 += 8) {
            __m256 r[8];
            for (int j = 0; j < 8; j++) {
                int64_t t = b * KB + j0 + j;
                r[j] = t < T ? widen8(k_pool + (int64_t)slots[t] * slot_stride + h * D + d0) : _mm256_setzero_ps();
            }
            transpose8(r);
            for (int d = 0; d < 8; d++) _mm256_storeu_ps(kb + (d0 + d) * KB + j0, r[d]);
        }
    for (int j = 0; j < KB; j++) {
        int64_t t = b * KB + j;
        for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(vb + j * D + d, t < T ? widen8(v_pool + (int64_t)slots[t] * slot_stride + h * D + d)
                                                   : _mm256_setzero_ps());
    }
}

/* acc[i][0..1] = sum over p < n of a[i * a_stride + p] * b[p * b_stride + 0..16], for 6 rows i:
   12 accumulators, each load of b shared by 6 FMAs (S = Q K^T and P V of the extend tile). */
static inline __attribute__((always_inline)) void outer6x16(const float *a, int a_stride, const float *b, int b_stride,
                                                            const int n, __m256 acc[6][2]) {
    for (int i = 0; i < 6; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int p = 0; p < n; p++) {
        const __m256 b0 = _mm256_loadu_ps(b + p * b_stride), b1 = _mm256_loadu_ps(b + p * b_stride + 8);
        for (int i = 0; i < 6; i++) {
            const __m256 x = _mm256_broadcast_ss(a + i * a_stride + p);
            acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
        }
    }
}

/* One task: nv query vectors qf[QT][D] (fp32, scaled; zeros past nv), positions pos[QT] (-1:
   padding), over key blocks 0..nblocks of one packed head; writes o[QT][D] (fp32, normalized). */
static inline __attribute__((always_inline)) void extend_tile(const float *qf, const int64_t *pos, int nv,
                                                              const float *kp, const float *vp, int64_t nblocks,
                                                              float *o, const int D) {
    float m[QT], l[QT], alpha[QT], s[QT][KB] __attribute__((aligned(32)));
    int live[QT];
    const int n6 = (nv + 5) / 6 * 6;
    for (int i = 0; i < QT; i++) { m[i] = -FLT_MAX; l[i] = 0; live[i] = 0; alpha[i] = 1; }
    memset(o, 0, sizeof(float) * QT * D);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t b = 0; b < nblocks; b++) {
        const float *kb = kp + b * KB * D, *vb = vp + b * KB * D;
        /* S = Q K^T: 6 query vectors x 16 keys at a time */
        for (int i0 = 0; i0 < n6; i0 += 6)
            for (int kh = 0; kh < KB; kh += 16) {
                __m256 acc[6][2];
                outer6x16(qf + i0 * D, D, kb + kh, KB, D, acc);
                for (int i = 0; i < 6; i++) {
                    _mm256_store_ps(s[i0 + i] + kh, acc[i][0]);
                    _mm256_store_ps(s[i0 + i] + kh + 8, acc[i][1]);
                }
            }
        /* mask past each row's position, online softmax; P (fp32) replaces S */
        for (int i = 0; i < nv; i++) {
            const int64_t seen = pos[i] - b * KB + 1; /* keys of this block the row sees */
            live[i] = seen > 0;
            if (!live[i]) continue;
            __m256 x[4], valid[4];
            for (int c = 0; c < 4; c++) {
                x[c] = _mm256_load_ps(s[i] + 8 * c);
                if (seen < KB) {
                    valid[c] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)seen - 8 * c), lane));
                    x[c] = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x[c], valid[c]);
                }
            }
            const float bm = hmax8(_mm256_max_ps(_mm256_max_ps(x[0], x[1]), _mm256_max_ps(x[2], x[3])));
            const float mn = bm > m[i] ? bm : m[i];
            alpha[i] = expf(m[i] - mn); /* 0 on the row's first block (m = -FLT_MAX) */
            m[i] = mn;
            __m256 sum = _mm256_setzero_ps();
            for (int c = 0; c < 4; c++) {
                __m256 e = exp256(_mm256_sub_ps(x[c], _mm256_set1_ps(mn)));
                if (seen < KB) e = _mm256_and_ps(e, valid[c]);
                sum = _mm256_add_ps(sum, e);
                _mm256_store_ps(s[i] + 8 * c, e);
            }
            l[i] = l[i] * alpha[i] + hadd8(sum);
        }
        /* O = O * alpha + P V: 6 query vectors x 16 dims at a time */
        for (int i0 = 0; i0 < n6; i0 += 6)
            for (int dh = 0; dh < D; dh += 16) {
                __m256 acc[6][2];
                outer6x16(s[i0], KB, vb + dh, D, KB, acc);
                for (int i = 0; i < 6; i++) {
                    if (!live[i0 + i]) continue; /* a block the row cannot see leaves it as it was */
                    float *oi = o + (i0 + i) * D + dh;
                    const __m256 a = _mm256_set1_ps(alpha[i0 + i]);
                    _mm256_storeu_ps(oi, _mm256_fmadd_ps(_mm256_loadu_ps(oi), a, acc[i][0]));
                    _mm256_storeu_ps(oi + 8, _mm256_fmadd_ps(_mm256_loadu_ps(oi + 8), a, acc[i][1]));
                }
            }
    }
    for (int i = 0; i < nv; i++) {
        const __m256 inv = _mm256_set1_ps(l[i] > 0 ? 1.0f / l[i] : 0.0f);
        for (int d = 0; d < D; d += 8) _mm256_storeu_ps(o + i * D + d, _mm256_mul_ps(_mm256_loadu_ps(o + i * D + d), inv));
    }
}

/* As the AVX-512 extend_task, on fp32 (amx is ignored). */
static void extend_task(const uint16_t *q, int64_t q_stride, int64_t row0, int64_t rows, int64_t pos0, int64_t h,
                        int64_t G, int64_t D, const ext_word *kp, const ext_word *vp, float scale, uint16_t *out,
                        int64_t out_stride, int amx) {
    (void)amx;
    float qf[QT * 128] __attribute__((aligned(32))), o[QT * 128] __attribute__((aligned(32)));
    int64_t pos[QT];
    const int nv = (int)(rows * G);
    memset(qf, 0, sizeof(float) * QT * D);
    for (int64_t x = 0; x < QT; x++) pos[x] = -1;
    for (int64_t x = 0; x < rows; x++)
        for (int64_t g = 0; g < G; g++) {
            const uint16_t *src = q + (row0 + x) * q_stride + (h * G + g) * D;
            for (int64_t d = 0; d < D; d += 8)
                _mm256_storeu_ps(qf + (x * G + g) * D + d, _mm256_mul_ps(widen8(src + d), _mm256_set1_ps(scale)));
            pos[x * G + g] = pos0 + x;
        }
    int64_t nblocks = (pos0 + rows - 1) / KB + 1;
    if (D == 64) extend_tile(qf, pos, nv, kp, vp, nblocks, o, 64);
    else extend_tile(qf, pos, nv, kp, vp, nblocks, o, 128);
    for (int64_t x = 0; x < rows; x++)
        for (int64_t g = 0; g < G; g++) {
            uint16_t *dst = out + (row0 + x) * out_stride + (h * G + g) * D;
            const float *src = o + (x * G + g) * D;
            for (int64_t d = 0; d < D; d++) dst[d] = bf16_round(src[d]);
        }
}
#endif

/* q: bf16 [tokens, H * G, D] (row stride q_stride); k_pool, v_pool as for decode; R requests:
   request r's keys are slots[slot_start[r] .. slot_start[r + 1]) (its whole context in order), of
   which the last n_new[r] are its new rows, at query rows q_row[r] ..; out like q. Returns 0, or -1
   when out of memory (nothing written). */
int agent_rt_extend_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k_pool, const uint16_t *v_pool,
                              int64_t slot_stride, const int32_t *slots, const int64_t *slot_start, const int64_t *n_new,
                              const int64_t *q_row, int64_t R, int64_t H, int64_t G, int64_t D, float scale,
                              uint16_t *out, int64_t out_stride) {
    const int64_t RT = QT / G > 0 ? QT / G : 1;  /* query rows per task */
    int64_t blocks = 0, tiles = 0;
    int64_t *pack_at = malloc(sizeof(int64_t) * (R + 1));
    if (!pack_at) return -1;
    for (int64_t r = 0; r < R; r++) {
        int64_t T = slot_start[r + 1] - slot_start[r];
        pack_at[r] = blocks;
        blocks += (T + KB - 1) / KB;
        tiles += (n_new[r] + RT - 1) / RT;
    }
    pack_at[R] = blocks;
    /* per (block, head): K and V, EXT_WORDS(D) each */
    ext_word *packed = malloc(sizeof(ext_word) * (size_t)(blocks * H * 2 * EXT_WORDS(D) + 1));
    int64_t *task = malloc(sizeof(int64_t) * (2 * tiles * H + 2 * blocks + 1));
    if (!packed || !task) { free(packed); free(task); free(pack_at); return -1; }
    const int64_t per_head = blocks * EXT_WORDS(D);  /* words per head of K (and of V) */
    /* pack tasks: (request, block) */
    int64_t np = 0;
    for (int64_t r = 0; r < R; r++)
        for (int64_t b = 0; b < pack_at[r + 1] - pack_at[r]; b++, np++) { task[2 * np] = r; task[2 * np + 1] = b; }
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < np; i++) {
        int64_t r = task[2 * i], b = task[2 * i + 1];
        for (int64_t h = 0; h < H; h++)
            pack_kv_block(k_pool, v_pool, slot_stride, h, (int)D, slots + slot_start[r], slot_start[r + 1] - slot_start[r],
                          b, packed + h * 2 * per_head + pack_at[r] * EXT_WORDS(D),
                          packed + h * 2 * per_head + per_head + pack_at[r] * EXT_WORDS(D));
    }
    /* attention tasks: (request, first row of its tile), longest first */
    int64_t nt = 0;
    for (int64_t r = R - 1; r >= 0; r--)
        for (int64_t r0 = ((n_new[r] + RT - 1) / RT - 1) * RT; r0 >= 0; r0 -= RT, nt++) { task[2 * nt] = r; task[2 * nt + 1] = r0; }
    const int amx = tiles_on();
#pragma omp parallel
    {
    if (amx) amx_configure();
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t i = 0; i < nt; i++)
        for (int64_t h = 0; h < H; h++) {
            int64_t r = task[2 * i], r0 = task[2 * i + 1];
            int64_t T = slot_start[r + 1] - slot_start[r], first = T - n_new[r];
            int64_t rows = n_new[r] - r0 < RT ? n_new[r] - r0 : RT;
            const ext_word *kp = packed + h * 2 * per_head + pack_at[r] * EXT_WORDS(D);
            extend_task(q, q_stride, q_row[r] + r0, rows, first + r0, h, G, D, kp, kp + per_head, scale, out,
                        out_stride, amx);
        }
    if (amx) amx_release();
    }
    free(packed);
    free(task);
    free(pack_at);
    return 0;
}

/* Which extend kernel this build has: 1 on VDPBF16PS (AVX-512 BF16), 2 on fp32 FMAs (AVX2). */
int agent_rt_extend_ready(void) { return EXTEND_FORM; }

#else /* neither AVX-512 BF16 nor AVX2 in this build: no extend kernel */

int agent_rt_extend_ready(void) { return 0; }

int agent_rt_extend_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k_pool, const uint16_t *v_pool,
                              int64_t slot_stride, const int32_t *slots, const int64_t *slot_start, const int64_t *n_new,
                              const int64_t *q_row, int64_t R, int64_t H, int64_t G, int64_t D, float scale,
                              uint16_t *out, int64_t out_stride) {
    (void)q, (void)q_stride, (void)k_pool, (void)v_pool, (void)slot_stride, (void)slots, (void)slot_start, (void)n_new;
    (void)q_row, (void)R, (void)H, (void)G, (void)D, (void)scale, (void)out, (void)out_stride;
    return -2;
}

#endif /* HAVE_EXTEND */

#ifndef HAVE_DECODE /* neither AVX-512 BF16 nor AVX2 in this build */

int agent_rt_attention_amx(int want) { (void)want; return 0; }

int agent_rt_supports(int64_t G, int64_t D) { (void)G, (void)D; return 0; }

int agent_rt_decode_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k_pool, const uint16_t *v_pool,
                              int64_t slot_stride, const int32_t *slots, const int64_t *key_start,
                              const int32_t *rows, const int64_t *row_start, int64_t L, int64_t batch, int64_t H,
                              int64_t G, int64_t D, float scale, uint16_t *out, int64_t out_stride) {
    (void)q, (void)q_stride, (void)k_pool, (void)v_pool, (void)slot_stride, (void)slots, (void)key_start, (void)rows;
    (void)row_start, (void)L, (void)batch, (void)H, (void)G, (void)D, (void)scale, (void)out, (void)out_stride;
    return -2;
}

#endif
