/* See int4_rows.h. Each output (m, n) is accumulated in float32 as torch's kernel does: for k = 0 .. K - 1,
 * w = fma(q - 8, scale, zero) and acc = fma(x[m, k], w, acc), one fused multiply-add chain in k order, rounded
 * to bfloat16 at the end (to nearest even). The order never depends on M or on which rows share a call, so a
 * row's result is the same whichever kernel computed it, and the engine may pick either by row count. */
#include "int4_rows.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MC_X86 1
#endif

#define BLOCK_N 64 /* outputs per packed block: four 16-lane vectors */
#define KC 64      /* inputs dequantized at a time: 64 x 64 float32 = 16 KiB, held in L1 */

int mc_int4_rows_supported(void) {
#ifdef MC_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

#ifdef MC_X86
#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

/* float32 -> bfloat16, rounding to nearest even, NaN to 0xffff: ATen's cvtfp32_bf16. */
TARGET static inline __m256i to_bf16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    rounded = _mm512_srli_epi32(rounded, 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0xffff));
    return _mm512_cvtepi32_epi16(rounded);
}

TARGET static inline __m512 from_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* The scales and zeros of one group for the block's 64 outputs, as float32 vectors. */
TARGET static inline void load_group(const uint16_t *sz, int64_t N, int64_t n0, int64_t kb, __m512 *scale,
                                     __m512 *zero) {
    /* sz[kb, n, 0 / 1]: 64 outputs interleaved (s, z), 128 bfloat16 values. */
    const uint16_t *p = sz + (kb * N + n0) * 2;
    static const int even[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    static const int odd[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    __m512i ie = _mm512_loadu_si512((const void *)even), io = _mm512_loadu_si512((const void *)odd);
    for (int c = 0; c < 4; c++) {
        __m512 a = from_bf16(p + 32 * c), b = from_bf16(p + 32 * c + 16);
        scale[c] = _mm512_permutex2var_ps(a, ie, b);
        zero[c] = _mm512_permutex2var_ps(a, io, b);
    }
}

/* Weights [k0, k0 + kc) of block nb into wbuf (kc x 64 float32), each fma(q - 8, scale, zero). */
TARGET static void dequantize(const uint8_t *w, const uint16_t *sz, int64_t N, int64_t K, int64_t group,
                              int64_t nb, int64_t k0, int64_t kc, float *wbuf) {
    /* q - 8 for q in 0..15, looked up by the low four bits of each lane (as torch does). */
    const __m512 centred = _mm512_set_ps(7.0f, 6.0f, 5.0f, 4.0f, 3.0f, 2.0f, 1.0f, 0.0f, -1.0f, -2.0f, -3.0f, -4.0f,
                                         -5.0f, -6.0f, -7.0f, -8.0f);
    __m512 scale[4], zero[4];
    int64_t loaded = k0 / group;
    load_group(sz, N, nb * BLOCK_N, loaded, scale, zero);
    for (int64_t k = k0; k < k0 + kc; k++) {
        if (k / group != loaded) {
            loaded = k / group;
            load_group(sz, N, nb * BLOCK_N, loaded, scale, zero);
        }
        const uint8_t *bytes = w + (nb * K + k) * 32;
        /* Byte d < 16 holds outputs d (low nibble) and d + 32 (high); byte 16 + d holds d + 16 and d + 48. */
        __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
        __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + 16)));
        __m512 q[4] = {
            _mm512_permutexvar_ps(b0, centred),
            _mm512_permutexvar_ps(b1, centred),
            _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), centred),
            _mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), centred),
        };
        float *out = wbuf + (k - k0) * BLOCK_N;
        for (int c = 0; c < 4; c++)
            _mm512_store_ps(out + 16 * c, _mm512_fmadd_ps(q[c], scale[c], zero[c]));
    }
}

/* acc[r] (64 float32 each) += x[r, k0 .. k0 + kc) times wbuf, for ROWS rows, one fma per k in order. */
#define ROW_KERNEL(ROWS)                                                                                    \
    TARGET static void rows_##ROWS(const float *xf, int64_t K, int64_t k0, int64_t kc, const float *wbuf,   \
                                   float *acc) {                                                           \
        __m512 c[ROWS][4];                                                                                  \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int j = 0; j < 4; j++) c[r][j] = _mm512_load_ps(acc + r * BLOCK_N + 16 * j);               \
        for (int64_t k = 0; k < kc; k++) {                                                                  \
            const float *wk = wbuf + k * BLOCK_N;                                                          \
            __m512 b[4] = {_mm512_load_ps(wk), _mm512_load_ps(wk + 16), _mm512_load_ps(wk + 32),            \
                           _mm512_load_ps(wk + 48)};                                                        \
            for (int r = 0; r < ROWS; r++) {                                                                \
                __m512 a = _mm512_set1_ps(xf[r * K + k0 + k]);                                              \
                for (int j = 0; j < 4; j++) c[r][j] = _mm512_fmadd_ps(a, b[j], c[r][j]);                    \
            }                                                                                               \
        }                                                                                                   \
        for (int r = 0; r < ROWS; r++)                                                                      \
            for (int j = 0; j < 4; j++) _mm512_store_ps(acc + r * BLOCK_N + 16 * j, c[r][j]);               \
    }
ROW_KERNEL(1)
ROW_KERNEL(4)

TARGET static void one_block(const float *xf, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M,
                             int64_t N, int64_t K, int64_t group, int64_t nb, float *wbuf, float *acc) {
    memset(acc, 0, (size_t)M * BLOCK_N * sizeof(float));
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        int64_t kc = K - k0 < KC ? K - k0 : KC;
        dequantize(w, sz, N, K, group, nb, k0, kc, wbuf);
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) rows_4(xf + m * K, K, k0, kc, wbuf, acc + m * BLOCK_N);
        for (; m < M; m++) rows_1(xf + m * K, K, k0, kc, wbuf, acc + m * BLOCK_N);
    }
    for (int64_t m = 0; m < M; m++)
        for (int j = 0; j < 4; j += 2) {
            __m256i lo = to_bf16(_mm512_load_ps(acc + m * BLOCK_N + 16 * j));
            __m256i hi = to_bf16(_mm512_load_ps(acc + m * BLOCK_N + 16 * (j + 1)));
            uint16_t *out = y + m * N + nb * BLOCK_N + 16 * j;
            _mm256_storeu_si256((__m256i *)out, lo);
            _mm256_storeu_si256((__m256i *)(out + 16), hi);
        }
}

TARGET static void widen(const uint16_t *x, float *xf, int64_t count) {
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) _mm512_storeu_ps(xf + i, from_bf16(x + i));
    for (; i < count; i++) {
        uint32_t bits = (uint32_t)x[i] << 16;
        memcpy(xf + i, &bits, sizeof bits);
    }
}

int mc_int4_rows_mm(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                    int64_t K, int64_t group, int threads) {
    float *xf = aligned_alloc(64, ((size_t)M * K * sizeof(float) + 63) / 64 * 64);
    if (xf == NULL) return -1;
    widen(x, xf, M * K);
    int64_t blocks = N / BLOCK_N;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads > blocks) threads = (int)blocks;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *wbuf = aligned_alloc(64, KC * BLOCK_N * sizeof(float));
        float *acc = aligned_alloc(64, (size_t)M * BLOCK_N * sizeof(float));
        int ready = wbuf != NULL && acc != NULL;
        /* Every thread reaches the loop (its end is a barrier); one without scratch leaves its blocks undone. */
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < blocks; nb++) {
            if (ready)
                one_block(xf, w, sz, y, M, N, K, group, nb, wbuf, acc);
            else
                failed = 1;
        }
        free(wbuf);
        free(acc);
    }
    free(xf);
    return failed ? -1 : 0;
}

#else

int mc_int4_rows_mm(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                    int64_t K, int64_t group, int threads) {
    (void)x; (void)w; (void)sz; (void)y; (void)M; (void)N; (void)K; (void)group; (void)threads;
    return -1;
}

#endif
