/* CPU kernels for the decode step (x86-64 with AVX2 and FMA), loaded by cpu_kernels.py through ctypes.
 *
 * linear_bf16: y = x W^T with x and y in fp32 and W kept in bf16, converted to fp32 in registers.
 *   Meta's checkpoints store bf16, so the fp32 weights we would otherwise keep are exact upcasts:
 *   this is the same fp32 math over half the bytes. A decode step streams every weight once for a
 *   handful of rows, so its time is memory plus compute; halving the memory is most of the gain.
 * decode_attention: one query per sequence over its own blocks of the paged cache, its own positions
 *   only (a batched attention call would gather every sequence up to the longest and mask the rest).
 *   decode_attention_bf16 reads a bf16 cache (the bf16 model's) with the same fp32 math.
 *
 * Threads: OpenMP regions with the thread count passed in (torch's), in the same OpenMP runtime as
 * torch (libgomp.so.1, already loaded by torch when this library is opened) when built with gcc;
 * another compiler's OpenMP runtime would give the process a second thread pool.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define NB 16  /* output columns per weight panel: two 8-float vectors */
#define KB 256 /* inner-dimension block: one panel block in fp32 is 16 KiB, stays in L1 */
#define MR 6   /* rows per micro-kernel: 6 x 2 accumulators + 2 weights + 1 broadcast = 15 registers */
#define MB 96  /* rows per outer block, so a prefill's rows are reused from cache across panels */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* 8 bf16 values to 8 fp32 values: a bf16 is the top half of the fp32 with the same value. */
static inline __m256 bf16x8_to_fp32(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Panel layout (made by bf16_panels in cpu_kernels.py): panel p holds output rows p*NB .. p*NB+NB-1
 * of W (N x K), k-major: panels[(p*K + k)*NB + j] = W[p*NB + j][k], rows past N are zero. */

/* y[0:mr, 0:NB] (+)= x[0:mr, 0:kb] . w[0:kb, 0:NB]; mr is a constant after inlining, so the
 * accumulators live in registers. */
static inline __attribute__((always_inline)) void micro(const int mr, const float *x, int64_t ldx, const float *w,
                                                         int64_t kb, float *y, int64_t ldy, int first) {
    __m256 acc[MR][2];
    for (int r = 0; r < mr; r++) {
        acc[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * ldy);
        acc[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * ldy + 8);
    }
    for (int64_t k = 0; k < kb; k++) {
        __m256 w0 = _mm256_load_ps(w + k * NB), w1 = _mm256_load_ps(w + k * NB + 8);
        for (int r = 0; r < mr; r++) {
            __m256 b = _mm256_broadcast_ss(x + r * ldx + k);
            acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < mr; r++) {
        _mm256_storeu_ps(y + r * ldy, acc[r][0]);
        _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
    }
}

static void micro_rows(int mr, const float *x, int64_t ldx, const float *w, int64_t kb, float *y, int64_t ldy,
                       int first) {
    switch (mr) {
    case 1: micro(1, x, ldx, w, kb, y, ldy, first); break;
    case 2: micro(2, x, ldx, w, kb, y, ldy, first); break;
    case 3: micro(3, x, ldx, w, kb, y, ldy, first); break;
    case 4: micro(4, x, ldx, w, kb, y, ldy, first); break;
    case 5: micro(5, x, ldx, w, kb, y, ldy, first); break;
    default: micro(6, x, ldx, w, kb, y, ldy, first); break;
    }
}

/* y (M x N) = x (M x K) . W^T, W in panels; x and y contiguous fp32. */
void linear_bf16(const float *x, int64_t M, int64_t K, const uint16_t *panels, int64_t N, float *y, int nthreads) {
    int64_t n_panels = (N + NB - 1) / NB;
    for (int64_t m_block = 0; m_block < M; m_block += MB) {
        int64_t m_end = min64(m_block + MB, M);
#pragma omp parallel num_threads(nthreads)
        {
            float w[KB * NB] __attribute__((aligned(32))); /* one panel block, converted */
            float tail[MR * NB];                            /* the last panel when N % NB != 0 */
#pragma omp for schedule(static)
            for (int64_t p = 0; p < n_panels; p++) {
                int64_t n0 = p * NB, cols = min64(NB, N - n0);
                for (int64_t k0 = 0; k0 < K; k0 += KB) {
                    int64_t kb = min64(KB, K - k0);
                    const uint16_t *src = panels + (p * K + k0) * NB;
                    for (int64_t i = 0; i < kb * NB; i += 8)
                        _mm256_store_ps(w + i, bf16x8_to_fp32(src + i));
                    for (int64_t m0 = m_block; m0 < m_end; m0 += MR) {
                        int mr = (int)min64(MR, m_end - m0);
                        const float *xs = x + m0 * K + k0;
                        if (cols == NB) {
                            micro_rows(mr, xs, K, w, kb, y + m0 * N + n0, N, k0 == 0);
                            continue;
                        }
                        for (int r = 0; r < mr && k0 > 0; r++)
                            memcpy(tail + r * NB, y + (m0 + r) * N + n0, cols * sizeof(float));
                        micro_rows(mr, xs, K, w, kb, tail, NB, k0 == 0);
                        for (int r = 0; r < mr; r++)
                            memcpy(y + (m0 + r) * N + n0, tail + r * NB, cols * sizeof(float));
                    }
                }
            }
        }
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 8 horizontal sums of a[0..7], in one vector: lane j holds the sum of a[j]'s lanes. */
static inline __m256 hsum8(const __m256 a[8]) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    /* s0123 lanes: a0 a1 a2 a3 (low halves), a0 a1 a2 a3 (high halves); likewise s4567 for a4..a7 */
    __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    return _mm256_add_ps(lo, hi);
}

/* e^x for x <= 0, 8 at a time: 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2
 * split in two parts so r is exact), e^r by its Taylor series to r^7 (error under 1e-8 relative). Below -87
 * the result is 0, as expf's underflows. */
static inline __m256 exp8(__m256 x) {
    const __m256 min = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, min, _CMP_LT_OQ);
    x = _mm256_max_ps(x, min);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 e = _mm256_set1_ps(1.0f / 5040);
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 720));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 120));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 24));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 6));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(0.5f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(e, _mm256_castsi256_ps(bits)));
}

/* p[0:L] = softmax(p[0:L]). */
static void softmax(float *p, int64_t L) {
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    int64_t l = 0;
    for (; l + 8 <= L; l += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(p + l));
    float lanes[8], top = -INFINITY, sum = 0;
    _mm256_storeu_ps(lanes, top8);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    for (; l < L; l++) top = p[l] > top ? p[l] : top;
    __m256 sum8 = _mm256_setzero_ps(), t = _mm256_set1_ps(top);
    for (l = 0; l + 8 <= L; l += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + l), t));
        _mm256_storeu_ps(p + l, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    sum = hsum(sum8);
    for (; l < L; l++) {
        p[l] = expf(p[l] - top);
        sum += p[l];
    }
    __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (l = 0; l + 8 <= L; l += 8) _mm256_storeu_ps(p + l, _mm256_mul_ps(_mm256_loadu_ps(p + l), inv));
    for (; l < L; l++) p[l] *= 1.0f / sum;
}

/* 8 cache values from fp32 or bf16 storage (bf16 a constant after inlining) as 8 fp32 values. */
static inline __attribute__((always_inline)) __m256 load8(const int bf16, const void *base, int64_t i) {
    return bf16 ? bf16x8_to_fp32((const uint16_t *)base + i) : _mm256_loadu_ps((const float *)base + i);
}

/* o[0:8*nv] (+)= sum_l p[l] * v[l*D : l*D + 8*nv]; nv and bf16 are constants after inlining; v is
 * element offset `at` of the cache. */
static inline __attribute__((always_inline)) void weighted_sum(const int nv, const int bf16, const float *p,
                                                                const void *v, int64_t at, int64_t L, int64_t D,
                                                                float *o, int first) {
    __m256 acc[8];
    for (int j = 0; j < nv; j++) acc[j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(o + 8 * j);
    for (int64_t l = 0; l < L; l++) {
        __m256 pl = _mm256_set1_ps(p[l]);
        for (int j = 0; j < nv; j++) acc[j] = _mm256_fmadd_ps(pl, load8(bf16, v, at + l * D + 8 * j), acc[j]);
    }
    for (int j = 0; j < nv; j++) _mm256_storeu_ps(o + 8 * j, acc[j]);
}

#define WEIGHTED_SUM_CASES(BF16)                                                                                      \
    switch (nv) {                                                                                                     \
    case 1: weighted_sum(1, BF16, p, v, at, L, D, o, first); break;                                                   \
    case 2: weighted_sum(2, BF16, p, v, at, L, D, o, first); break;                                                   \
    case 3: weighted_sum(3, BF16, p, v, at, L, D, o, first); break;                                                   \
    case 4: weighted_sum(4, BF16, p, v, at, L, D, o, first); break;                                                   \
    case 5: weighted_sum(5, BF16, p, v, at, L, D, o, first); break;                                                   \
    case 6: weighted_sum(6, BF16, p, v, at, L, D, o, first); break;                                                   \
    case 7: weighted_sum(7, BF16, p, v, at, L, D, o, first); break;                                                   \
    default: weighted_sum(8, BF16, p, v, at, L, D, o, first); break;                                                  \
    }

static void weighted_sum_any(int nv, int bf16, const float *p, const void *v, int64_t at, int64_t L, int64_t D,
                             float *o, int first) {
    if (bf16) {
        WEIGHTED_SUM_CASES(1)
    } else {
        WEIGHTED_SUM_CASES(0)
    }
}

/* Attention of one query per sequence over its own paged cache (D a multiple of 8), after the step
 * has written its keys and values. q, out: (B, H, D) fp32; k_cache, v_cache: (blocks, KVH, BS, D), fp32
 * or (bf16 != 0) bf16, read as fp32; tables: (B, M) block ids; sequence b attends to its positions
 * 0..pos[b], position l in block tables[b][l / BS] at offset l % BS. Query head h reads key/value head
 * h / (H / KVH) (grouped-query attention). scratch: nthreads x M*BS floats. */
static inline __attribute__((always_inline)) void attend(const int bf16, const float *q, const void *k_cache,
                                                          const void *v_cache, const int64_t *tables,
                                                          const int64_t *pos, int64_t B, int64_t H, int64_t KVH,
                                                          int64_t BS, int64_t D, int64_t M, float scale,
                                                          float *out, float *scratch, int nthreads) {
    int64_t group = H / KVH;
#pragma omp parallel num_threads(nthreads)
    {
        float *p = scratch + omp_get_thread_num() * M * BS; /* this thread's scores, then probabilities */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * H; i++) {
            int64_t b = i / H, L = pos[b] + 1, g = (i % H) / group;
            const int64_t *table = tables + b * M;
            const float *qi = q + i * D;
            for (int64_t l0 = 0; l0 < L; l0 += BS) {
                int64_t keys = (table[l0 / BS] * KVH + g) * BS * D; /* element offset of the block's head */
                int64_t n = min64(BS, L - l0), l = 0;
                for (; l + 8 <= n; l += 8) { /* 8 keys at once, their 8 sums reduced together */
                    __m256 acc[8];
                    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
                    for (int64_t d = 0; d < D; d += 8) {
                        __m256 qd = _mm256_loadu_ps(qi + d);
                        for (int j = 0; j < 8; j++)
                            acc[j] = _mm256_fmadd_ps(qd, load8(bf16, k_cache, keys + (l + j) * D + d), acc[j]);
                    }
                    _mm256_storeu_ps(p + l0 + l, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
                }
                for (; l < n; l++) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int64_t d = 0; d < D; d += 8)
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), load8(bf16, k_cache, keys + l * D + d), acc);
                    p[l0 + l] = hsum(acc) * scale;
                }
            }
            softmax(p, L);
            float *o = out + i * D;
            for (int64_t l0 = 0; l0 < L; l0 += BS) {
                int64_t values = (table[l0 / BS] * KVH + g) * BS * D;
                int64_t n = min64(BS, L - l0);
                for (int64_t d = 0; d < D; d += 64)
                    weighted_sum_any((int)(min64(64, D - d) / 8), bf16, p + l0, v_cache, values + d, n, D, o + d,
                                     l0 == 0);
            }
        }
    }
}

void decode_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                      const int64_t *pos, int64_t B, int64_t H, int64_t KVH, int64_t BS, int64_t D, int64_t M,
                      float scale, float *out, float *scratch, int nthreads) {
    attend(0, q, k_cache, v_cache, tables, pos, B, H, KVH, BS, D, M, scale, out, scratch, nthreads);
}

/* decode_attention over a bf16 cache (the bf16 model's): the same fp32 math, the cache converted on load. */
void decode_attention_bf16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *tables,
                           const int64_t *pos, int64_t B, int64_t H, int64_t KVH, int64_t BS, int64_t D, int64_t M,
                           float scale, float *out, float *scratch, int nthreads) {
    attend(1, q, k_cache, v_cache, tables, pos, B, H, KVH, BS, D, M, scale, out, scratch, nthreads);
}
