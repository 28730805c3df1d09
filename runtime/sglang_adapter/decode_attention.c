/* Decode attention over a paged bf16 KV pool for x86-64 CPUs with AVX-512 BF16.

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
   rounded to bf16 (round to nearest even). */

#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 256
#define BLOCK 16

int agent_rt_abi_version(void) { return 1; }

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

/* 16 bf16 -> 16 fp32 */
static inline __m512 widen(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
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

#define ROW_CASE(GG, DD)                                                                               \
    if (G == GG && D == DD) {                                                                          \
        attend_row(q, k_pool, v_pool, slot_stride, h, slots, n, scale, part, GG, DD, first_row);       \
        return;                                                                                        \
    }

static void attend_row_any(const uint16_t *q, const uint16_t *k_pool, const uint16_t *v_pool, int64_t slot_stride,
                           int64_t h, const int32_t *slots, int64_t n, float scale, float *part, int G, int D, int first_row) {
    ROW_CASE(1, 64) ROW_CASE(2, 64) ROW_CASE(3, 64) ROW_CASE(4, 64)
    ROW_CASE(5, 64) ROW_CASE(6, 64) ROW_CASE(7, 64) ROW_CASE(8, 64)
    ROW_CASE(1, 128) ROW_CASE(2, 128) ROW_CASE(3, 128) ROW_CASE(4, 128)
    ROW_CASE(5, 128) ROW_CASE(6, 128) ROW_CASE(7, 128) ROW_CASE(8, 128)
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
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; i++) {
        int64_t l = task[3 * i], c = task[3 * i + 1];
        int64_t k0 = key_start[l] + c * CHUNK, k1 = k0 + CHUNK < key_start[l + 1] ? k0 + CHUNK : key_start[l + 1];
        int64_t nr = row_start[l + 1] - row_start[l];
        float *u = part + task[3 * i + 2] * (D + 2);
        for (int64_t h = 0; h < H; h++)
            for (int64_t r = 0; r < nr; r++)
                attend_row_any(q + rows[row_start[l] + r] * q_stride + h * G * D, k_pool, v_pool, slot_stride, h,
                               slots + k0, k1 - k0, scale, u + (r * H + h) * G * (D + 2), (int)G, (int)D, r == 0);
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
            for (int64_t d = 0; d < D; d += 16)
                _mm256_storeu_si256((__m256i *)(o + d),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(s + 2 + d), _mm512_set1_ps(inv))));
        }
    free(state);
    free(part);
    free(task);
    return 0;
}
