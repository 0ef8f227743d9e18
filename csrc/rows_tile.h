/* What the GGUF block kernels (q8_rows.c, q4_rows.c) share: float32 rows times weights widened from blocks, every
 * output (m, n) one fixed sequence whatever the row count, the rows sharing a call or the thread count. Eight
 * float32 lanes, lane i summing k = i, i + 8, ... in k order by fused multiply-add of x[m, k] with the exact
 * weight, then the eight lanes added in a fixed tree. A format supplies two routines that keep to that sequence:
 * one computing up to DIRECT_ROWS rows straight from its blocks (the weights widened in registers), and one widening
 * up to TILE_N outputs' weights into an L1 tile, which the tiled kernels here then reuse for every row. Only
 * included by those files, compiled for AVX2, FMA and F16C. */
#ifndef MINERCORE_ROWS_TILE_H
#define MINERCORE_ROWS_TILE_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define TILE_N 8      /* outputs widened together into the L1 tile: 8 x K float32 (18 KiB at K = 576) */
#define DIRECT_ROWS 4 /* up to this many rows widen in registers: cheaper than storing the tile and reading it back */
#define TARGET __attribute__((target("avx2,fma,f16c")))

/* y[r, n0 .. n0 + count) for r < M (M <= DIRECT_ROWS), from the format's blocks ``w``. */
typedef void (*few_rows_fn)(const void *w, const float *x, float *y, int64_t M, int64_t N, int64_t K, int64_t n0,
                            int64_t count);
/* Outputs [n0, n0 + count)'s weights into tile (count rows of K float32, K apart, 32-byte aligned). */
typedef void (*widen_fn)(const void *w, float *tile, int64_t K, int64_t n0, int64_t count);

/* The eight lanes' sum, always in the same tree: (0 + 4, 1 + 5, 2 + 6, 3 + 7), then pairs, then the last two. */
TARGET static inline float lanes_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

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
TILED(3, 4)
TILED(2, 4)
TILED(1, 4)
TILED(4, 2)
TILED(3, 2)
TILED(2, 2)
TILED(1, 2)
TILED(4, 1)
TILED(3, 1)
TILED(2, 1)
TILED(1, 1)
#undef TILED

typedef void (*tiled_fn)(const float *, const float *, float *, int64_t, int64_t);
static const tiled_fn TILED_QUADS[4] = {0, tiled_1_4, tiled_2_4, tiled_3_4};
static const tiled_fn TILED_PAIRS[5] = {0, tiled_1_2, tiled_2_2, tiled_3_2, tiled_4_2};
static const tiled_fn TILED_SINGLES[5] = {0, tiled_1_1, tiled_2_1, tiled_3_1, tiled_4_1};

/* Outputs [n0, n0 + count) (count <= TILE_N) for every row, from the widened tile, four rows at a time. */
TARGET static inline void tile_rows(const float *x, const float *tile, float *y, int64_t M, int64_t N, int64_t K,
                                    int64_t n0, int64_t count) {
    int64_t j = 0;
    for (; j + 4 <= count; j += 4)
        for (int64_t m = 0; m < M; m += 3) {
            int rows = M - m < 3 ? (int)(M - m) : 3;
            TILED_QUADS[rows](x + m * K, tile + j * K, y + m * N + n0 + j, K, N);
        }
    for (int64_t m = 0; m < M; m += 4) {
        int rows = M - m < 4 ? (int)(M - m) : 4;
        int64_t i = j;
        for (; i + 2 <= count; i += 2) TILED_PAIRS[rows](x + m * K, tile + i * K, y + m * N + n0 + i, K, N);
        for (; i < count; i++) TILED_SINGLES[rows](x + m * K, tile + i * K, y + m * N + n0 + i, K, N);
    }
}

/* The whole product over TILE_N-output tiles shared among the threads: straight from the blocks for up to DIRECT_ROWS
 * rows, through the tile for more. Returns 0, or -1 when a thread had no scratch memory for its tile. */
static int rows_drive(const void *w, const float *x, float *y, int64_t M, int64_t N, int64_t K, int threads,
                      few_rows_fn few, widen_fn widen) {
    int64_t tiles = (N + TILE_N - 1) / TILE_N;
    int failed = 0;
    if (M <= 0 || N <= 0) return 0; /* nothing to compute (and no direct kernel for zero rows) */
    if (threads < 1) threads = 1;
    if (threads > tiles) threads = (int)tiles;
    if (M <= DIRECT_ROWS) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n0 = t * TILE_N;
            few(w, x, y, M, N, K, n0, N - n0 < TILE_N ? N - n0 : TILE_N);
        }
        return 0;
    }
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *tile = aligned_alloc(32, (size_t)TILE_N * K * sizeof(float));
        /* Every thread reaches the loop (its end is a barrier); one without scratch leaves its tiles undone. */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n0 = t * TILE_N, count = N - n0 < TILE_N ? N - n0 : TILE_N;
            if (tile != NULL) {
                widen(w, tile, K, n0, count);
                tile_rows(x, tile, y, M, N, K, n0, count);
            } else {
                failed = 1;
            }
        }
        free(tile);
    }
    return failed ? -1 : 0;
}

#endif
