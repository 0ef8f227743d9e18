/* What the int8-row kernels (q4_i8_rows.c, q8_i8_rows.c) share: a row quantized per block of 32 as llama.cpp's
 * Q8_1 (dx = amax / 127, qx = rint(x / dx), sx = dx * sum(qx)), and the scratch holding a call's quantized rows.
 * Only included by those files, compiled for AVX2, FMA and F16C (their products also for AVX-512 VNNI). */
#ifndef MINERCORE_ROWS_I8_H
#define MINERCORE_ROWS_I8_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32        /* values per block, of the weights and of a quantized row */
#define GROUP 8      /* outputs a kernel computes side by side, one per 32-bit lane */
#define GROUP_ROWS 4 /* rows sharing a group's weights */
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define TARGET_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))

/* A row's blocks as int8 values qx with their scales dx and dx * sum(qx). A block holding a NaN gets a NaN scale,
 * so the NaN reaches every output as it would through float32 products. */
TARGET static void quantize_row(const float *x, int64_t K, int8_t *qx, float *dx, float *sx) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / QK; b++) {
        const float *p = x + b * QK;
        __m256 v[4], amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(p + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float top = _mm_cvtss_f32(h), d = top / 127.0f;
        __m256 inverse = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)); /* nearest, ties even */
        __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
        sum4 = _mm_hadd_epi32(sum4, sum4);
        sum4 = _mm_hadd_epi32(sum4, sum4);
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(qx + b * QK), bytes);
        if (_mm256_movemask_ps(nan)) d = __builtin_nanf("");
        dx[b] = d;
        sx[b] = d * (float)_mm_cvtsi128_si32(sum4);
    }
}

/* A call's rows quantized: M x K int8 values, then per row and block dx and sx. */
typedef struct {
    int8_t *qx;
    float *dx;
    float *sx;
} quantized_rows;

/* Every row of x [M, K] quantized into fresh scratch; 0, or -1 without memory (nothing to free then). */
TARGET static inline int quantize_rows(const float *x, int64_t M, int64_t K, quantized_rows *rows) {
    const int64_t blocks = K / QK;
    rows->qx = malloc((size_t)(M * K));
    rows->dx = malloc((size_t)(2 * M * blocks) * sizeof(float));
    if (rows->qx == NULL || rows->dx == NULL) {
        free(rows->qx);
        free(rows->dx);
        return -1;
    }
    rows->sx = rows->dx + M * blocks;
    for (int64_t r = 0; r < M; r++)
        quantize_row(x + r * K, K, rows->qx + r * K, rows->dx + r * blocks, rows->sx + r * blocks);
    return 0;
}

static inline void free_rows(quantized_rows *rows) {
    free(rows->qx);
    free(rows->dx);
}

/* A format's kernel for one group of 8 outputs (``group``) and ``count`` <= GROUP_ROWS rows from row ``r``, writing
 * y[r .., 8 group ..]. */
typedef void (*group_fn)(const void *weights, int64_t group, const quantized_rows *rows, int64_t r, int count,
                         float *y, int64_t K, int64_t N);

/* The whole product: x's rows quantized once, then every group of 8 outputs, shared among the threads, for every
 * run of up to GROUP_ROWS rows. Returns 0, or -1 without memory for the quantized rows. */
static int i8_drive(const void *weights, const float *x, float *y, int64_t M, int64_t N, int64_t K, int threads,
                    group_fn kernel) {
    const int64_t groups = N / GROUP;
    quantized_rows rows;
    if (M <= 0 || N <= 0) return 0;
    if (quantize_rows(x, M, K, &rows) != 0) return -1;
    if (threads < 1) threads = 1;
    if (threads > groups) threads = (int)groups;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++)
        for (int64_t r = 0; r < M; r += GROUP_ROWS)
            kernel(weights, g, &rows, r, M - r < GROUP_ROWS ? (int)(M - r) : GROUP_ROWS, y, K, N);
    free_rows(&rows);
    return 0;
}

#endif
