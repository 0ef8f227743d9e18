/* See q8_rows.h. Each output (m, n) is one fixed sequence: eight float32 lanes, lane i summing k = i, i + 8, ...
 * in k order by fused multiply-add of x[m, k] with the exact weight d * q, then the eight lanes added in a fixed
 * tree. The kernels below differ only in how many rows and outputs share a pass and in whether the weights are
 * widened in registers (one or two rows) or once into an L1 tile reused by every row (more rows); none of that
 * changes an output's sequence. */
#include "q8_rows.h"

#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MC_X86 1
#endif

#define QK 32     /* weights per Q8_0 block */
#define TILE_N 8  /* outputs widened together into the L1 tile: 8 x K float32 (18 KiB at K = 576) */

int mc_q8_rows_supported(void) {
#ifdef MC_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

#ifdef MC_X86
#define TARGET __attribute__((target("avx2,fma")))

/* The eight weights q[k .. k + 8) times their block's scale, exact in float32. */
TARGET static inline __m256 widen8(const int8_t *q, __m256 scale) {
    __m256i wide = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(wide), scale);
}

/* The eight lanes' sum, always in the same tree: (0 + 4, 1 + 5, 2 + 6, 3 + 7), then pairs, then the last two. */
TARGET static inline float lanes_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
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
DIRECT(2, 1)

/* ROWS rows times OUTS outputs, the weights read from the widened tile (OUTS rows of K, K apart). */
#define TILED(ROWS, OUTS)                                                                                   \
    TARGET static void tiled_##ROWS##_##OUTS(const float *x, const float *w, float *y, int64_t K,           \
                                             int64_t N) {                                                  \
        __m256 acc[ROWS][OUTS];                                                                             \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int j = 0; j < OUTS; j++) acc[r][j] = _mm256_setzero_ps();                                 \
        for (int64_t k = 0; k < K; k += 8) {                                                                \
            __m256 wk[OUTS];                                                                                \
            for (int j = 0; j < OUTS; j++) wk[j] = _mm256_load_ps(w + j * K + k);                           \
            for (int r = 0; r < ROWS; r++) {                                                                \
                __m256 a = _mm256_loadu_ps(x + r * K + k);                                                  \
                for (int j = 0; j < OUTS; j++) acc[r][j] = _mm256_fmadd_ps(a, wk[j], acc[r][j]);            \
            }                                                                                               \
        }                                                                                                   \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int j = 0; j < OUTS; j++) y[r * N + j] = lanes_sum(acc[r][j]);                             \
    }
TILED(4, 2)
TILED(3, 2)
TILED(2, 2)
TILED(1, 2)
TILED(4, 1)
TILED(3, 1)
TILED(2, 1)
TILED(1, 1)

typedef void (*tiled_fn)(const float *, const float *, float *, int64_t, int64_t);
static const tiled_fn TILED_PAIRS[5] = {0, tiled_1_2, tiled_2_2, tiled_3_2, tiled_4_2};
static const tiled_fn TILED_SINGLES[5] = {0, tiled_1_1, tiled_2_1, tiled_3_1, tiled_4_1};

/* Outputs [n0, n0 + count) for one or two rows, widening in registers. */
TARGET static void few_rows(const float *x, const int8_t *q, const float *d, float *y, int64_t M, int64_t N,
                            int64_t K, int64_t n0, int64_t count) {
    int64_t n = n0, end = n0 + count;
    if (M == 1) {
        for (; n + 4 <= end; n += 4) direct_1_4(x, q + n * K, d + n * (K / QK), y + n, K, N);
        for (; n < end; n++) direct_1_1(x, q + n * K, d + n * (K / QK), y + n, K, N);
    } else {
        for (; n + 2 <= end; n += 2) direct_2_2(x, q + n * K, d + n * (K / QK), y + n, K, N);
        for (; n < end; n++) direct_2_1(x, q + n * K, d + n * (K / QK), y + n, K, N);
    }
}

/* Outputs [n0, n0 + count) (count <= TILE_N) for every row: widened once into tile, then four rows at a time. */
TARGET static void many_rows(const float *x, const int8_t *q, const float *d, float *y, int64_t M, int64_t N,
                             int64_t K, int64_t n0, int64_t count, float *tile) {
    for (int64_t j = 0; j < count; j++) {
        const int8_t *qj = q + (n0 + j) * K;
        const float *dj = d + (n0 + j) * (K / QK);
        for (int64_t k = 0; k < K; k += 8)
            _mm256_store_ps(tile + j * K + k, widen8(qj + k, _mm256_broadcast_ss(dj + k / QK)));
    }
    for (int64_t m = 0; m < M; m += 4) {
        int rows = M - m < 4 ? (int)(M - m) : 4;
        int64_t j = 0;
        for (; j + 2 <= count; j += 2) TILED_PAIRS[rows](x + m * K, tile + j * K, y + m * N + n0 + j, K, N);
        for (; j < count; j++) TILED_SINGLES[rows](x + m * K, tile + j * K, y + m * N + n0 + j, K, N);
    }
}

int mc_q8_rows_mm(const float *x, const int8_t *q, const float *d, float *y, int64_t M, int64_t N, int64_t K,
                  int threads) {
    int64_t tiles = (N + TILE_N - 1) / TILE_N;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads > tiles) threads = (int)tiles;
    if (M <= 2) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n0 = t * TILE_N;
            few_rows(x, q, d, y, M, N, K, n0, N - n0 < TILE_N ? N - n0 : TILE_N);
        }
        return 0;
    }
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *tile = aligned_alloc(32, (size_t)TILE_N * K * sizeof(float));
        /* Every thread reaches the loop (its end is a barrier); one without scratch leaves its tiles undone. */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n0 = t * TILE_N;
            if (tile != NULL)
                many_rows(x, q, d, y, M, N, K, n0, N - n0 < TILE_N ? N - n0 : TILE_N, tile);
            else
                failed = 1;
        }
        free(tile);
    }
    return failed ? -1 : 0;
}

#else

int mc_q8_rows_mm(const float *x, const int8_t *q, const float *d, float *y, int64_t M, int64_t N, int64_t K,
                  int threads) {
    (void)x; (void)q; (void)d; (void)y; (void)M; (void)N; (void)K; (void)threads;
    return -1;
}

#endif
