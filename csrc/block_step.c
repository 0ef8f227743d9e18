/* See block_step.h. */
#include "block_step.h"

#include "cpu_features.h"
#include "q4_i8_rows.h"
#include "q8_i8_rows.h"
#include "step_attention.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int mc_block_step_supported(void) { return mc_cpu_has_avx2_fma_f16c(); }

#ifdef MC_X86
#include <immintrin.h>

#define TARGET __attribute__((target("avx2,fma")))

static int rows_mm(const mc_rows_linear *layer, const float *x, float *y, int64_t rows, int threads, int vnni) {
    if (layer->format == MC_ROWS_Q4)
        return mc_q4_i8_rows_mm(x, layer->w, layer->scales, y, rows, layer->n, layer->k, threads, vnni);
    return mc_q8_i8_rows_mm(x, layer->w, layer->scales, y, rows, layer->n, layer->k, threads, vnni);
}

/* One row of d values (a multiple of 8): y = w * (x / sqrt(mean(x^2) + eps)). */
TARGET static void rms_norm_row(const float *x, const float *w, float eps, float *y, int64_t d) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    const __m256 r = _mm256_set1_ps(1.0f / sqrtf(_mm_cvtss_f32(h) / (float)d + eps));
    for (int64_t i = 0; i < d; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), r)));
}

/* exp(x) for 8 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), e^r by Cephes' degree-6 polynomial,
 * times 2^n through the exponent bits. Inputs are clamped to where the result is a finite float or zero. */
TARGET static __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* act[m] = silu(gu[0 .. m)) * gu[m .. 2m) for one row, m a multiple of 8. A NaN gate stays NaN (it divides). */
TARGET static void silu_mul_row(const float *gu, float *act, int64_t m) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < m; i += 8) {
        __m256 g = _mm256_loadu_ps(gu + i), u = _mm256_loadu_ps(gu + m + i);
        __m256 e = exp8(_mm256_xor_ps(g, sign));
        _mm256_storeu_ps(act + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u));
    }
}

TARGET static void add_rows(const float *a, const float *b, float *y, int64_t count) {
    for (int64_t i = 0; i < count; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
}

int mc_norm_linear(const float *x, const float *norm, float eps, const mc_rows_linear *layer, float *y, int64_t rows,
                   int threads, int vnni) {
    const int64_t d = layer->k;
    float *h = malloc((size_t)(rows * d) * sizeof(float));
    if (h == NULL) return -1;
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * d, norm, eps, h + r * d, d);
    int status = rows_mm(layer, h, y, rows, threads, vnni);
    free(h);
    return status;
}

int mc_block_tail(const float *x, const float *attn, const mc_rows_linear *o, const float *norm, float eps,
                  const mc_rows_linear *gate_up, const mc_rows_linear *down, float *out, int64_t rows, int threads,
                  int vnni) {
    const int64_t d = o->n, m = down->k;
    float *scratch = malloc((size_t)(rows * (2 * d + 3 * m)) * sizeof(float));
    if (scratch == NULL) return -1;
    float *part = scratch, *h = part + rows * d, *gu = h + rows * d, *act = gu + rows * 2 * m;
    int status = rows_mm(o, attn, part, rows, threads, vnni);
    if (status == 0) {
        add_rows(x, part, out, rows * d);
        for (int64_t r = 0; r < rows; r++) rms_norm_row(out + r * d, norm, eps, h + r * d, d);
        status = rows_mm(gate_up, h, gu, rows, threads, vnni);
    }
    if (status == 0) {
        for (int64_t r = 0; r < rows; r++) silu_mul_row(gu + r * 2 * m, act + r * m, m);
        status = rows_mm(down, act, part, rows, threads, vnni);
    }
    if (status == 0) add_rows(out, part, out, rows * d);
    free(scratch);
    return status;
}

int mc_attend_block_tail(const float *x, const float *q, const float *k_pool, const float *v_pool,
                         const int64_t *tables, int64_t table_stride, int64_t block_size, int64_t num_blocks,
                         const int64_t *at, int64_t batch, int64_t kv_heads, int64_t q_rows, int64_t steps,
                         int64_t head_dim, int64_t ctx, const mc_rows_linear *o, const float *norm, float eps,
                         const mc_rows_linear *gate_up, const mc_rows_linear *down, float *out, int threads,
                         int vnni) {
    const int64_t groups = q_rows / steps, rows = batch * steps, width = kv_heads * groups * head_dim;
    const int64_t block = block_size * head_dim;
    float *scratch = malloc((size_t)(2 * rows * width) * sizeof(float)); /* the heads, then their rows */
    if (scratch == NULL) return -1;
    float *heads = scratch, *merged = scratch + rows * width;
    int status = mc_step_attention(q, k_pool, v_pool, at, heads, batch, kv_heads, q_rows, steps, head_dim, ctx,
                                   kv_heads * block, block, kv_heads * block, block, tables, table_stride,
                                   block_size, num_blocks, 1.0f / sqrtf((float)head_dim), threads);
    if (status == 0) {
        /* Row (b, t) holds every query head's result side by side: head h * groups + g is row g * steps + t of KV
         * head h's queries. */
        for (int64_t b = 0; b < batch; b++)
            for (int64_t h = 0; h < kv_heads; h++)
                for (int64_t g = 0; g < groups; g++)
                    for (int64_t t = 0; t < steps; t++)
                        memcpy(merged + (b * steps + t) * width + (h * groups + g) * head_dim,
                               heads + ((b * kv_heads + h) * q_rows + g * steps + t) * head_dim,
                               (size_t)head_dim * sizeof(float));
        status = mc_block_tail(x, merged, o, norm, eps, gate_up, down, out, rows, threads, vnni);
    }
    free(scratch);
    return status;
}

#else

int mc_norm_linear(const float *x, const float *norm, float eps, const mc_rows_linear *layer, float *y, int64_t rows,
                   int threads, int vnni) {
    (void)x; (void)norm; (void)eps; (void)layer; (void)y; (void)rows; (void)threads; (void)vnni;
    return -1;
}

int mc_block_tail(const float *x, const float *attn, const mc_rows_linear *o, const float *norm, float eps,
                  const mc_rows_linear *gate_up, const mc_rows_linear *down, float *out, int64_t rows, int threads,
                  int vnni) {
    (void)x; (void)attn; (void)o; (void)norm; (void)eps; (void)gate_up; (void)down; (void)out; (void)rows;
    (void)threads; (void)vnni;
    return -1;
}

int mc_attend_block_tail(const float *x, const float *q, const float *k_pool, const float *v_pool,
                         const int64_t *tables, int64_t table_stride, int64_t block_size, int64_t num_blocks,
                         const int64_t *at, int64_t batch, int64_t kv_heads, int64_t q_rows, int64_t steps,
                         int64_t head_dim, int64_t ctx, const mc_rows_linear *o, const float *norm, float eps,
                         const mc_rows_linear *gate_up, const mc_rows_linear *down, float *out, int threads,
                         int vnni) {
    (void)x; (void)q; (void)k_pool; (void)v_pool; (void)tables; (void)table_stride; (void)block_size;
    (void)num_blocks; (void)at; (void)batch; (void)kv_heads; (void)q_rows; (void)steps; (void)head_dim; (void)ctx;
    (void)o; (void)norm; (void)eps; (void)gate_up; (void)down; (void)out; (void)threads; (void)vnni;
    return -1;
}

#endif
