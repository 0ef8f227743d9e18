/* See q8_rows.h. Each output (m, n) is rows_tile.h's fixed sequence over the exact weights d * q; the kernels
 * below differ only in how many rows and outputs share a pass, which changes no output's sequence. */
#include "q8_rows.h"

#include "cpu_features.h"

#define QK 32 /* weights per Q8_0 block */

int mc_q8_rows_supported(void) { return mc_cpu_has_avx2_fma_f16c(); }

#ifdef MC_X86
#include "rows_tile.h"

typedef struct {
    const int8_t *q;
    const float *d;
} q8_weights;

/* The eight weights q[k .. k + 8) times their block's scale, exact in float32. */
TARGET static inline __m256 widen8(const int8_t *q, __m256 scale) {
    __m256i wide = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(wide), scale);
}

/* ROWS rows times OUTS outputs, the weights widened in registers from q and d. */
#define DIRECT(ROWS, OUTS)                                                                                  \
    TARGET static void direct_##ROWS##_##OUTS(const float *x, const int8_t *q, const float *d, float *y,    \
                                              int64_t K, int64_t N) {                                     \
        __m256 acc[ROWS][OUTS];                                                                             \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int j = 0; j < OUTS; j++) acc[r][j] = _mm256_setzero_ps();                                 \
        for (int64_t b = 0; b < K / QK; b++) {                                                              \
            __m256 scale[OUTS];                                                                             \
            for (int j = 0; j < OUTS; j++) scale[j] = _mm256_broadcast_ss(d + j * (K / QK) + b);            \
            for (int64_t k = b * QK; k < (b + 1) * QK; k += 8) {                                            \
                __m256 w[OUTS];                                                                             \
                for (int j = 0; j < OUTS; j++) w[j] = widen8(q + j * K + k, scale[j]);                      \
                for (int r = 0; r < ROWS; r++) {                                                            \
                    __m256 a = _mm256_loadu_ps(x + r * K + k);                                              \
                    for (int j = 0; j < OUTS; j++) acc[r][j] = _mm256_fmadd_ps(a, w[j], acc[r][j]);         \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int j = 0; j < OUTS; j++) y[r * N + j] = lanes_sum(acc[r][j]);                             \
    }
DIRECT(1, 4)
DIRECT(1, 1)
DIRECT(2, 2)
DIRECT(3, 2)
DIRECT(4, 2)
DIRECT(2, 1)
DIRECT(3, 1)
DIRECT(4, 1)

typedef void (*direct_fn)(const float *, const int8_t *, const float *, float *, int64_t, int64_t);
static const direct_fn DIRECT_PAIRS[DIRECT_ROWS + 1] = {0, 0, direct_2_2, direct_3_2, direct_4_2};
static const direct_fn DIRECT_SINGLES[DIRECT_ROWS + 1] = {0, 0, direct_2_1, direct_3_1, direct_4_1};

/* Outputs [n0, n0 + count) for up to DIRECT_ROWS rows, widening in registers (one row four outputs at a time). */
TARGET static void few_rows(const void *w, const float *x, float *y, int64_t M, int64_t N, int64_t K, int64_t n0,
                            int64_t count) {
    const int8_t *q = ((const q8_weights *)w)->q;
    const float *d = ((const q8_weights *)w)->d;
    int64_t n = n0, end = n0 + count;
    if (M == 1) {
        for (; n + 4 <= end; n += 4) direct_1_4(x, q + n * K, d + n * (K / QK), y + n, K, N);
        for (; n < end; n++) direct_1_1(x, q + n * K, d + n * (K / QK), y + n, K, N);
        return;
    }
    for (; n + 2 <= end; n += 2) DIRECT_PAIRS[M](x, q + n * K, d + n * (K / QK), y + n, K, N);
    for (; n < end; n++) DIRECT_SINGLES[M](x, q + n * K, d + n * (K / QK), y + n, K, N);
}

/* Outputs [n0, n0 + count)'s weights into the tile. */
TARGET static void widen(const void *w, float *tile, int64_t K, int64_t n0, int64_t count) {
    const int8_t *q = ((const q8_weights *)w)->q;
    const float *d = ((const q8_weights *)w)->d;
    for (int64_t j = 0; j < count; j++) {
        const int8_t *qj = q + (n0 + j) * K;
        const float *dj = d + (n0 + j) * (K / QK);
        for (int64_t k = 0; k < K; k += 8)
            _mm256_store_ps(tile + j * K + k, widen8(qj + k, _mm256_broadcast_ss(dj + k / QK)));
    }
}

int mc_q8_rows_mm(const float *x, const int8_t *q, const float *d, float *y, int64_t M, int64_t N, int64_t K,
                  int threads) {
    q8_weights w = {q, d};
    return rows_drive(&w, x, y, M, N, K, threads, few_rows, widen);
}

#else

int mc_q8_rows_mm(const float *x, const int8_t *q, const float *d, float *y, int64_t M, int64_t N, int64_t K,
                  int threads) {
    (void)x; (void)q; (void)d; (void)y; (void)M; (void)N; (void)K; (void)threads;
    return -1;
}

#endif
