/* See q4_i8_rows.h. The weights are laid out for 8 outputs at once: in each group of 8 outputs, each block is four
 * 32-byte vectors; lane j (4 bytes) of vector i holds output j's values 4 i .. 4 i + 3 of the block in its low
 * nibbles and 4 i + 16 .. 4 i + 19 in its high ones. One vector times a row's 4 int8 values, broadcast, gives the
 * 8 outputs' partial sums side by side, so a group's results need no horizontal sums. */
#include "q4_i8_rows.h"

#include "cpu_features.h"

#include <string.h>

int mc_q4_i8_rows_supported(void) { return mc_cpu_has_avx2_fma_f16c(); }

int mc_q4_i8_rows_vnni_supported(void) { return mc_cpu_has_avx512_vnni(); }

#ifdef MC_X86
#include "rows_i8.h"

/* How a block's integer dot products add up in a lane. AVX2 sums maddubs pairs in 16 bits and widens them once a
 * block (madd with ones): a block's 16 pairs per lane add up at most 32 products of 15 and 127 (60,960 over two
 * lanes, 30,480 in one), so they cannot overflow. AVX-512 VNNI's dpbusd adds four products straight into 32 bits:
 * the same integers, so both give every output the same bits. */
#define DOT_ADD_avx2(sum, u8, s8) _mm256_add_epi16(sum, _mm256_maddubs_epi16(u8, s8))
#define DOT_WIDEN_avx2(sum) _mm256_madd_epi16(sum, _mm256_set1_epi16(1))
#define DOT_ADD_vnni(sum, u8, s8) _mm256_dpbusd_epi32(sum, u8, s8)
#define DOT_WIDEN_vnni(sum) (sum)
#define TARGET_avx2 TARGET
#define TARGET_vnni TARGET_VNNI

/* ROWS rows times one group of 8 outputs, in instruction set ISA. */
#define ROWS_TIMES_GROUP(ISA, ROWS)                                                                           \
    TARGET_##ISA static void rows_##ISA##_##ROWS(const uint8_t *w, const uint16_t *dm, const int8_t *qx,       \
                                                 const float *dx, const float *sx, float *y, int64_t K,        \
                                                 int64_t N) {                                                  \
        const int64_t blocks = K / QK;                                                                        \
        const __m256i low4 = _mm256_set1_epi8(0x0F);                                                          \
        __m256 acc[ROWS];                                                                                     \
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();                                          \
        for (int64_t b = 0; b < blocks; b++) {                                                                \
            __m256i sums[ROWS];                                                                               \
            for (int r = 0; r < ROWS; r++) sums[r] = _mm256_setzero_si256();                                  \
            for (int i = 0; i < 4; i++) {                                                                     \
                __m256i packed = _mm256_loadu_si256((const __m256i *)(w + b * 128 + 32 * i));                 \
                __m256i head = _mm256_and_si256(packed, low4);                                                \
                __m256i tail = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);                          \
                for (int r = 0; r < ROWS; r++) {                                                              \
                    int32_t first, second;                                                                    \
                    memcpy(&first, qx + r * K + b * QK + 4 * i, sizeof first);                                \
                    memcpy(&second, qx + r * K + b * QK + 4 * i + 16, sizeof second);                         \
                    sums[r] = DOT_ADD_##ISA(sums[r], head, _mm256_set1_epi32(first));                         \
                    sums[r] = DOT_ADD_##ISA(sums[r], tail, _mm256_set1_epi32(second));                        \
                }                                                                                             \
            }                                                                                                 \
            __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + b * 16)));                      \
            __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + b * 16 + 8)));                  \
            for (int r = 0; r < ROWS; r++) {                                                                  \
                __m256 dot = _mm256_cvtepi32_ps(DOT_WIDEN_##ISA(sums[r]));                                    \
                __m256 scale = _mm256_mul_ps(d, _mm256_broadcast_ss(dx + r * blocks + b));                    \
                acc[r] = _mm256_fmadd_ps(dot, scale, acc[r]);                                                 \
                acc[r] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(sx + r * blocks + b), acc[r]);                \
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

typedef void (*rows_fn)(const uint8_t *, const uint16_t *, const int8_t *, const float *, const float *, float *,
                        int64_t, int64_t);
static const rows_fn ROWS_FNS_AVX2[GROUP_ROWS + 1] = {0, rows_avx2_1, rows_avx2_2, rows_avx2_3, rows_avx2_4};
static const rows_fn ROWS_FNS_VNNI[GROUP_ROWS + 1] = {0, rows_vnni_1, rows_vnni_2, rows_vnni_3, rows_vnni_4};

typedef struct {
    const uint8_t *w;
    const uint16_t *dm;
    const rows_fn *fns; /* by row count, in the instruction set chosen */
} q4_weights;

/* One group of 8 outputs for count rows from row r (i8_drive's group_fn). */
TARGET static void q4_group(const void *weights, int64_t g, const quantized_rows *rows, int64_t r, int count,
                            float *y, int64_t K, int64_t N) {
    const q4_weights *wt = weights;
    const int64_t blocks = K / QK;
    wt->fns[count](wt->w + g * blocks * 128, wt->dm + g * blocks * 16, rows->qx + r * K, rows->dx + r * blocks,
                    rows->sx + r * blocks, y + r * N + g * GROUP, K, N);
}

int mc_q4_i8_rows_mm(const float *x, const uint8_t *w, const uint16_t *dm, float *y, int64_t M, int64_t N, int64_t K,
                     int threads, int vnni) {
    q4_weights weights = {w, dm, vnni && mc_cpu_has_avx512_vnni() ? ROWS_FNS_VNNI : ROWS_FNS_AVX2};
    return i8_drive(&weights, x, y, M, N, K, threads, q4_group);
}

#else

int mc_q4_i8_rows_mm(const float *x, const uint8_t *w, const uint16_t *dm, float *y, int64_t M, int64_t N, int64_t K,
                     int threads, int vnni) {
    (void)x; (void)w; (void)dm; (void)y; (void)M; (void)N; (void)K; (void)threads; (void)vnni;
    return -1;
}

#endif
