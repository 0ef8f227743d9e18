/* The rows' work of a Llama block's decode or verify step around its attention, on a CPU: the input norm and the
 * q/k/v product in one call, and everything after the attention (output product, residual, norm, gated MLP,
 * residual) in another, over the int8-row kernels (q4_i8_rows.c, q8_i8_rows.c). A compiled step pays the host's
 * cost of every call (about 8 us a product), and unfused a block takes ten calls; with these, four (the rotary
 * embedding with the cache write, and the attention, between them). Every row's result depends on that row alone,
 * as in the kernels. */
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

#endif
