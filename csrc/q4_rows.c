/* See q4_rows.h. Each output (m, n) is rows_tile.h's fixed sequence over the weights fma(q, d, m), the file's
 * values rounded once to float32; the kernels below differ only in how many rows and outputs share a pass, which
 * changes no output's sequence. */
#include "q4_rows.h"

#include "cpu_features.h"

#include <string.h>

#define QK 32 /* weights per Q4 block */

int mc_q4_rows_supported(void) { return mc_cpu_has_avx2_fma_f16c(); }

#ifdef MC_X86
#include "rows_tile.h"

typedef struct {
    const uint8_t *q;
    const uint16_t *dm;
} q4_weights;

/* Block ``at``'s scale and minimum, widened from their float16 pair and broadcast. */
TARGET static inline void block_scales(const uint16_t *dm, int64_t at, __m256 *d, __m256 *m) {
    int32_t bits;
    memcpy(&bits, dm + 2 * at, sizeof bits);
    __m128 pair = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
    *d = _mm256_broadcastss_ps(pair);
    *m = _mm256_broadcastss_ps(_mm_movehdup_ps(pair));
}

/* One block's 32 weights, k order, as four vectors of eight: fma(q, d, m). Bytes j .. j + 8 widened to 32-bit
 * lanes hold values j .. j + 8 in their low nibbles and j + 16 .. j + 24 in their high ones. */
TARGET static inline void widen32(const uint8_t *bytes, __m256 d, __m256 m, __m256 w[4]) {
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    __m256i head = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
    __m256i tail = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + 8)));
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(head, low4)), d, m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(tail, low4)), d, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(head, 4)), d, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(tail, 4)), d, m);
}

/* ROWS rows times OUTS outputs, each block's weights widened in registers, output by output. */
#define DIRECT(ROWS, OUTS)                                                                                  \
    TARGET static void direct_##ROWS##_##OUTS(const float *x, const q4_weights *wt, int64_t n, float *y,    \
                                              int64_t K, int64_t N) {                                     \
        const int64_t blocks = K / QK;                                                                      \
        __m256 acc[ROWS][OUTS];                                                                             \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int j = 0; j < OUTS; j++) acc[r][j] = _mm256_setzero_ps();                                 \
        for (int64_t b = 0; b < blocks; b++) {                                                              \
            for (int j = 0; j < OUTS; j++) {                                                                \
                __m256 w[4], d, m;                                                                          \
                int64_t at = (n + j) * blocks + b;                                                          \
                block_scales(wt->dm, at, &d, &m);                                                           \
                widen32(wt->q + at * (QK / 2), d, m, w);                                                    \
                for (int r = 0; r < ROWS; r++)                                                              \
                    for (int i = 0; i < 4; i++)                                                             \
                        acc[r][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + b * QK + 8 * i), w[i],      \
                                                    acc[r][j]);                                             \
            }                                                                                               \
        }                                                                                                   \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int j = 0; j < OUTS; j++) y[r * N + j] = lanes_sum(acc[r][j]);                             \
    }
DIRECT(1, 2)
DIRECT(2, 2)
DIRECT(3, 2)
DIRECT(4, 2)
DIRECT(1, 1)
DIRECT(2, 1)
DIRECT(3, 1)
DIRECT(4, 1)

typedef void (*direct_fn)(const float *, const q4_weights *, int64_t, float *, int64_t, int64_t);
static const direct_fn DIRECT_PAIRS[DIRECT_ROWS + 1] = {0, direct_1_2, direct_2_2, direct_3_2, direct_4_2};
static const direct_fn DIRECT_SINGLES[DIRECT_ROWS + 1] = {0, direct_1_1, direct_2_1, direct_3_1, direct_4_1};

/* Outputs [n0, n0 + count) for up to DIRECT_ROWS rows, widening in registers. */
TARGET static void few_rows(const void *w, const float *x, float *y, int64_t M, int64_t N, int64_t K, int64_t n0,
                            int64_t count) {
    int64_t n = n0, end = n0 + count;
    for (; n + 2 <= end; n += 2) DIRECT_PAIRS[M](x, w, n, y + n, K, N);
    for (; n < end; n++) DIRECT_SINGLES[M](x, w, n, y + n, K, N);
}

/* Outputs [n0, n0 + count)'s weights into the tile. */
TARGET static void widen(const void *w, float *tile, int64_t K, int64_t n0, int64_t count) {
    const q4_weights *wt = w;
    const int64_t blocks = K / QK;
    for (int64_t j = 0; j < count; j++) {
        for (int64_t b = 0; b < blocks; b++) {
            __m256 v[4], d, m;
            int64_t at = (n0 + j) * blocks + b;
            block_scales(wt->dm, at, &d, &m);
            widen32(wt->q + at * (QK / 2), d, m, v);
            for (int i = 0; i < 4; i++) _mm256_store_ps(tile + j * K + b * QK + 8 * i, v[i]);
        }
    }
}

int mc_q4_rows_mm(const float *x, const uint8_t *q, const uint16_t *dm, float *y, int64_t M, int64_t N, int64_t K,
                  int threads) {
    q4_weights w = {q, dm};
    return rows_drive(&w, x, y, M, N, K, threads, few_rows, widen);
}

#else

int mc_q4_rows_mm(const float *x, const uint8_t *q, const uint16_t *dm, float *y, int64_t M, int64_t N, int64_t K,
                  int threads) {
    (void)x; (void)q; (void)dm; (void)y; (void)M; (void)N; (void)K; (void)threads;
    return -1;
}

#endif
