/* See q8_i8_rows.h. Each 32-byte vector holds four consecutive weights of 8 outputs (lane j: output j), so one
 * vector times a row's 4 int8 values, broadcast, gives the 8 outputs' partial sums side by side. maddubs and dpbusd
 * want one unsigned operand: they multiply the weights' magnitudes by the row's values carrying the weights' signs. */
#include "q8_i8_rows.h"

#include "cpu_features.h"

#include <string.h>

int mc_q8_i8_rows_supported(void) { return mc_cpu_has_avx2_fma_f16c(); }

int mc_q8_i8_rows_vnni_supported(void) { return mc_cpu_has_avx512_vnni(); }

#ifdef MC_X86
#include "rows_i8.h"

/* How four weights' products add up in a lane. AVX2 multiplies pairs with maddubs (a pair is at most 2 x 128 x 127,
 * 32,512, and fits 16 bits) and widens them to 32 bits at once (madd with ones), where a block's sum does not fit 16;
 * AVX-512 VNNI's dpbusd adds the four products straight into 32 bits. The same integers, so the same bits. */
#define DOT_ADD_avx2(sum, u8, s8) \
    _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(u8, s8), _mm256_set1_epi16(1)))
#define DOT_ADD_vnni(sum, u8, s8) _mm256_dpbusd_epi32(sum, u8, s8)
#define TARGET_avx2 TARGET
#define TARGET_vnni TARGET_VNNI

/* ROWS rows times one group of 8 outputs, in instruction set ISA. */
#define ROWS_TIMES_GROUP(ISA, ROWS)                                                                           \
    TARGET_##ISA static void rows_##ISA##_##ROWS(const int8_t *w, const float *d, const int8_t *qx,            \
                                                 const float *dx, float *y, int64_t K, int64_t N) {            \
        const int64_t blocks = K / QK;                                                                        \
        __m256 acc[ROWS];                                                                                     \
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();                                          \
        for (int64_t b = 0; b < blocks; b++) {                                                                \
            __m256i sums[ROWS];                                                                               \
            for (int r = 0; r < ROWS; r++) sums[r] = _mm256_setzero_si256();                                  \
            for (int c = 0; c < 8; c++) {                                                                     \
                __m256i weights = _mm256_loadu_si256((const __m256i *)(w + b * 256 + 32 * c));                \
                __m256i magnitudes = _mm256_abs_epi8(weights);                                                \
                for (int r = 0; r < ROWS; r++) {                                                              \
                    int32_t chunk;                                                                            \
                    memcpy(&chunk, qx + r * K + b * QK + 4 * c, sizeof chunk);                                \
                    __m256i signed_x = _mm256_sign_epi8(_mm256_set1_epi32(chunk), weights);                   \
                    sums[r] = DOT_ADD_##ISA(sums[r], magnitudes, signed_x);                                   \
                }                                                                                             \
            }                                                                                                 \
            __m256 scale_w = _mm256_loadu_ps(d + b * GROUP);                                                  \
            for (int r = 0; r < ROWS; r++) {                                                                  \
                __m256 scale = _mm256_mul_ps(scale_w, _mm256_broadcast_ss(dx + r * blocks + b));              \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, acc[r]);                         \
            }                                                                                                 \
        }                                                                                                     \
        for (int r = 0; r < ROWS; r++) _mm256_storeu_ps(y + r * N, acc[r]);                                   \
    }
#define ROWS_TIMES_GROUP_ALL(ISA)                                                                             \
    ROWS_TIMES_GROUP(ISA, 1)                                                                                  \
    ROWS_TIMES_GROUP(ISA, 2)                                                                                  \
    ROWS_TIMES_GROUP(ISA, 3)                                                                                  \
    ROWS_TIMES_GROUP(ISA, 4)
ROWS_TIMES_GROUP_ALL(avx2)
ROWS_TIMES_GROUP_ALL(vnni)
#undef ROWS_TIMES_GROUP_ALL
#undef ROWS_TIMES_GROUP

typedef void (*rows_fn)(const int8_t *, const float *, const int8_t *, const float *, float *, int64_t, int64_t);
static const rows_fn ROWS_FNS_AVX2[GROUP_ROWS + 1] = {0, rows_avx2_1, rows_avx2_2, rows_avx2_3, rows_avx2_4};
static const rows_fn ROWS_FNS_VNNI[GROUP_ROWS + 1] = {0, rows_vnni_1, rows_vnni_2, rows_vnni_3, rows_vnni_4};

typedef struct {
    const int8_t *w;
    const float *d;
    const rows_fn *fns; /* by row count, in the instruction set chosen */
} q8_weights;

/* One group of 8 outputs for count rows from row r (i8_drive's group_fn). */
TARGET static void q8_group(const void *weights, int64_t g, const quantized_rows *rows, int64_t r, int count,
                            float *y, int64_t K, int64_t N) {
    const q8_weights *wt = weights;
    const int64_t blocks = K / QK;
    wt->fns[count](wt->w + g * blocks * 256, wt->d + g * blocks * GROUP, rows->qx + r * K, rows->dx + r * blocks,
                    y + r * N + g * GROUP, K, N);
}

int mc_q8_i8_rows_mm(const float *x, const int8_t *w, const float *d, float *y, int64_t M, int64_t N, int64_t K,
                     int threads, int vnni) {
    q8_weights weights = {w, d, vnni && mc_cpu_has_avx512_vnni() ? ROWS_FNS_VNNI : ROWS_FNS_AVX2};
    return i8_drive(&weights, x, y, M, N, K, threads, q8_group);
}

#else

int mc_q8_i8_rows_mm(const float *x, const int8_t *w, const float *d, float *y, int64_t M, int64_t N, int64_t K,
                     int threads, int vnni) {
    (void)x; (void)w; (void)d; (void)y; (void)M; (void)N; (void)K; (void)threads; (void)vnni;
    return -1;
}

#endif
