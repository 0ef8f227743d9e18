/* See step_attention.h. A batch row's KV head is one task: its keys are read once for all its query rows (the
 * group's heads at every position of the step), and each query's scores, softmax and weighted sum follow the
 * fixed sequence the header gives, so the tasks' split among threads changes nothing. */
#include "step_attention.h"

#include "cpu_features.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int mc_step_attention_supported(void) { return mc_cpu_has_avx2_fma_f16c(); }

#ifdef MC_X86
#include <immintrin.h>

#define TARGET __attribute__((target("avx2,fma,f16c")))

/* Lane i sums the products of values i, i + 8, ... in order; the lanes are then summed pairwise (0+4, 1+5, 2+6,
 * 3+7, then 0+2, 1+3, then 0+1); a tail of D % 8 values follows, in order. */
TARGET static inline float dot(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_shuffle_ps(half, half, 1));
    float sum = _mm_cvtss_f32(half);
    for (; i < D; i++) sum = fmaf(a[i], b[i], sum);
    return sum;
}

/* y += w x over D values, lane by lane (each output value's sum runs in the callers' position order). */
TARGET static inline void axpy(float w, const float *x, float *y, int64_t D) {
    const __m256 weight = _mm256_set1_ps(w);
    int64_t i = 0;
    for (; i + 8 <= D; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(weight, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < D; i++) y[i] = fmaf(w, x[i], y[i]);
}

/* Where a KV head's values at position p start: positions D apart from base, or, with a block table (blocks not
 * NULL), position p % block_size of block blocks[p / block_size], blocks block_stride apart from base. */
typedef struct {
    const float *base;
    const int64_t *blocks;
    int64_t block_size, block_stride;
} positions;

static inline const float *position(const positions *at, int64_t p, int64_t D) {
    if (at->blocks == NULL) return at->base + p * D;
    return at->base + at->blocks[p / at->block_size] * at->block_stride + (p % at->block_size) * D;
}

/* One batch row's KV head: its R query rows, their scores in scratch (R x ctx) and their visible lengths in
 * visible (R). */
TARGET static void head(const float *q, const positions *k, const positions *v, const int64_t *at, float *out,
                        int64_t R, int64_t T, int64_t D, int64_t ctx, float scale, float *scores, int64_t *visible) {
    int64_t longest = 0;
    for (int64_t r = 0; r < R; r++) {
        int64_t last = at[r % T];
        visible[r] = last < 0 ? 0 : (last >= ctx ? ctx : last + 1);
        if (visible[r] > longest) longest = visible[r];
    }
    for (int64_t p = 0; p < longest; p++) {
        const float *key = position(k, p, D);
        for (int64_t r = 0; r < R; r++)
            if (p < visible[r]) scores[r * ctx + p] = dot(q + r * D, key, D) * scale;
    }
    memset(out, 0, (size_t)(R * D) * sizeof(float));
    for (int64_t r = 0; r < R; r++) {
        float *s = scores + r * ctx, top = -INFINITY, total = 0.0f;
        if (!visible[r]) continue;
        for (int64_t p = 0; p < visible[r]; p++) top = s[p] > top ? s[p] : top;
        for (int64_t p = 0; p < visible[r]; p++) {
            s[p] = expf(s[p] - top);
            total += s[p];
        }
        for (int64_t p = 0; p < visible[r]; p++) s[p] /= total;
    }
    for (int64_t p = 0; p < longest; p++) {
        const float *value = position(v, p, D);
        for (int64_t r = 0; r < R; r++)
            if (p < visible[r]) axpy(scores[r * ctx + p], value, out + r * D, D);
    }
}

int mc_step_attention(const float *q, const float *k, const float *v, const int64_t *at, float *out, int64_t B,
                      int64_t H, int64_t R, int64_t T, int64_t D, int64_t ctx, int64_t k_batch, int64_t k_head,
                      int64_t v_batch, int64_t v_head, const int64_t *tables, int64_t table_stride,
                      int64_t block_size, int64_t num_blocks, float scale, int threads) {
    const int64_t tasks = B * H;
    int failed = 0;
    if (tasks <= 0 || R <= 0 || D <= 0) return 0;
    if (ctx <= 0) {
        memset(out, 0, (size_t)(tasks * R * D) * sizeof(float));
        return 0;
    }
    if (tables != NULL) { /* every block a query can reach must lie in the pool */
        const int64_t reach = (ctx + block_size - 1) / block_size;
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < reach; i++)
                if (tables[b * table_stride + i] < 0 || tables[b * table_stride + i] >= num_blocks) return -2;
    }
    if (threads < 1) threads = 1;
    if (threads > tasks) threads = (int)tasks;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc((size_t)(R * ctx) * sizeof(float));
        int64_t *visible = malloc((size_t)R * sizeof(int64_t));
        if (!scores || !visible) failed = 1;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t b = task / H, h = task % H;
            const int64_t *blocks = tables == NULL ? NULL : tables + b * table_stride;
            /* With a table the batch strides are the pool's block strides. */
            positions keys = {k + h * k_head + (blocks == NULL ? b * k_batch : 0), blocks, block_size, k_batch};
            positions values = {v + h * v_head + (blocks == NULL ? b * v_batch : 0), blocks, block_size, v_batch};
            if (scores && visible)
                head(q + task * R * D, &keys, &values, at + b * T, out + task * R * D, R, T, D, ctx, scale, scores,
                     visible);
        }
        free(scores);
        free(visible);
    }
    return failed ? -1 : 0;
}

#else

int mc_step_attention(const float *q, const float *k, const float *v, const int64_t *at, float *out, int64_t B,
                      int64_t H, int64_t R, int64_t T, int64_t D, int64_t ctx, int64_t k_batch, int64_t k_head,
                      int64_t v_batch, int64_t v_head, const int64_t *tables, int64_t table_stride,
                      int64_t block_size, int64_t num_blocks, float scale, int threads) {
    (void)q; (void)k; (void)v; (void)at; (void)out; (void)B; (void)H; (void)R; (void)T; (void)D; (void)ctx;
    (void)k_batch; (void)k_head; (void)v_batch; (void)v_head; (void)tables; (void)table_stride; (void)block_size;
    (void)num_blocks;
    (void)scale; (void)threads;
    return -1;
}

#endif
