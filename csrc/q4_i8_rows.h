/* A GGUF file's Q4_0 and Q4_1 blocks times rows quantized to int8 per block of 32, as llama.cpp multiplies them
 * on a CPU (its Q8_1 activations): integer dot products of 32 weights at a time (AVX2's maddubs, or AVX-512 VNNI's
 * dpbusd where the CPU has it: the same integers), then each block's scales in float32. The row's quantization and
 * every output's sequence of operations depend on nothing but that row and that output, so a row's result does not
 * depend on the rows sharing the call (its batch) or the thread count. */
#ifndef MINERCORE_Q4_I8_ROWS_H
#define MINERCORE_Q4_I8_ROWS_H

#include <stdint.h>

/* 1 where this CPU runs the kernel (AVX2, FMA and F16C), else 0. */
int mc_q4_i8_rows_supported(void);

/* 1 where this CPU also has AVX-512 VNNI (on 256-bit vectors), which the kernel then may use, else 0. */
int mc_q4_i8_rows_vnni_supported(void);

/* y[M, N] (float32) = x[M, K] (float32, rows K apart) times W^T, W[n, k] = d q[n, k] + m with (d, m) the scale and
 * minimum of the block holding k, x's rows first quantized per block of 32: dx = amax / 127, qx = rint(x / dx),
 * sx = dx * sum(qx) (float32). Output n of row r is the float32 sequence over blocks b of
 * acc = fma(float(sum_k q qx), d dx, acc); acc = fma(m, sx, acc), from 0. N must be a multiple of 8 and K of 32.
 * w is the weights in groups of 8 outputs as q4_i8_rows.c lays them out, dm each group's blocks' float16 scales and
 * minimums: [N / 8, K / 32, 2, 8] (8 d, then 8 m). Returns 0, or -1 when scratch memory could not be allocated
 * (y is then unspecified). vnni != 0 takes AVX-512 VNNI's dot products where the CPU has them: the results are the
 * same bits either way. */
int mc_q4_i8_rows_mm(const float *x, const uint8_t *w, const uint16_t *dm, float *y, int64_t M, int64_t N, int64_t K,
                     int threads, int vnni);

#endif
