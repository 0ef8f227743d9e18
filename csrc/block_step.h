/* The rows' work of a Llama block's decode or verify step around its attention, on a CPU: the input norm and the
 * q/k/v product in one call, and everything after the attention (output product, residual, norm, gated MLP,
 * residual) in another, over the int8-row kernels (q4_i8_rows.c, q8_i8_rows.c). A compiled step pays the host's
 * cost of every call (about 8 us a product), and unfused a block takes ten calls; with these, four (the rotary
 * embedding with the cache write, and the attention, between them), or three where the attention over a paged cache
 * joins the tail's call. Every row's result depends on that row alone, as in the kernels. */
#ifndef MINERCORE_BLOCK_STEP_H
#define MINERCORE_BLOCK_STEP_H

#include <stdint.h>

#define MC_ROWS_Q4 4 /* w: q4_i8_rows' values, scales: its float16 (d, m) pairs */
#define MC_ROWS_Q8 8 /* w: q8_i8_rows' values, scales: its float32 scales */

/* A linear layer [n outputs, k inputs] in one of the int8-row kernels' layouts, without bias. */
typedef struct {
    int format;
    const void *w;
    const void *scales;
    int64_t n, k;
} mc_rows_linear;

/* 1 where this CPU runs the int8-row kernels (AVX2, FMA and F16C), else 0. */
int mc_block_step_supported(void);

/* y[rows, layer.n] = layer(rms_norm(x) * norm) for x [rows, layer.k], where each row is scaled by 1 / sqrt(mean of
 * its squares + eps) (the squares summed in 8 lanes, then the lanes in a fixed tree) and then multiplied by the norm
 * weight, as RMSNorm does in float32. layer.k must be a multiple of 32. Returns 0, -1 without memory. */
int mc_norm_linear(const float *x, const float *norm, float eps, const mc_rows_linear *layer, float *y, int64_t rows,
                   int threads, int vnni);

/* out[rows, d] = h + down(silu(gate) * up) where h = x + o(attn), [gate | up] = gate_up(rms_norm(h) * norm): a Llama
 * block's step after its attention, x [rows, d] its input, attn [rows, o.k] the attention's heads side by side.
 * silu(g) = g / (1 + exp(-g)), exp by a degree-6 polynomial (about 1 ulp). Returns 0, -1 without memory. */
int mc_block_tail(const float *x, const float *attn, const mc_rows_linear *o, const float *norm, float eps,
                  const mc_rows_linear *gate_up, const mc_rows_linear *down, float *out, int64_t rows, int threads,
                  int vnni);

/* mc_block_tail after the step's attention over a paged KV cache (step_attention.h, with a block table): q
 * [batch, kv_heads, q_rows, head_dim] (q_rows = groups * steps: a KV head's query heads, each at the step's
 * positions), k_pool and v_pool contiguous [num_blocks, kv_heads, block_size, head_dim], tables [batch,
 * table_stride], at [batch, steps]; x and out [batch * steps, o.n], o.k = kv_heads * groups * head_dim. The
 * attention's results are exactly step_attention's. Returns 0, -1 without memory, -2 for a table entry a query
 * can reach outside the pool. */
int mc_attend_block_tail(const float *x, const float *q, const float *k_pool, const float *v_pool,
                         const int64_t *tables, int64_t table_stride, int64_t block_size, int64_t num_blocks,
                         const int64_t *at, int64_t batch, int64_t kv_heads, int64_t q_rows, int64_t steps,
                         int64_t head_dim, int64_t ctx, const mc_rows_linear *o, const float *norm, float eps,
                         const mc_rows_linear *gate_up, const mc_rows_linear *down, float *out, int threads,
                         int vnni);

#endif
