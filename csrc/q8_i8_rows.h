/* A GGUF file's Q8_0 blocks times rows quantized to int8 per block of 32, as llama.cpp multiplies them on a CPU:
 * integer dot products of 32 weights at a time (AVX2's maddubs, or AVX-512 VNNI's dpbusd where the CPU has it, over
 * the weights' magnitudes and the rows' values signed by the weights'), then each block's scales in float32. A row's
 * quantization and every output's sequence of operations depend on nothing but that row and that output, so a row's
 * result does not depend on the rows sharing the call or the thread count. */
#ifndef MINERCORE_Q8_I8_ROWS_H
#define MINERCORE_Q8_I8_ROWS_H

#include <stdint.h>

/* 1 where this CPU runs the kernel (AVX2, FMA and F16C), else 0. */
int mc_q8_i8_rows_supported(void);

/* 1 where this CPU also has AVX-512 VNNI (on 256-bit vectors), which the kernel then may use, else 0. */
int mc_q8_i8_rows_vnni_supported(void);

/* y[M, N] (float32) = x[M, K] (float32, rows K apart) times W^T, W[n, k] = d q[n, k] with d the scale of the block
 * holding k, x's rows first quantized per block of 32 as in q4_i8_rows.h. Output n of row r is the float32 sequence
 * over blocks b of acc = fma(float(sum_k q qx), d dx, acc), from 0. N must be a multiple of 8 and K of 32. w is the
 * weights in groups of 8 outputs: [N / 8, K / 32, 8, 8, 4] int8, where [g, b, c, j] holds output 8 g + j's values
 * 4 c .. 4 c + 3 of block b; d each group's blocks' scales, [N / 8, K / 32, 8] float32. Returns 0, or -1 when
 * scratch memory could not be allocated (y is then unspecified). vnni != 0 takes AVX-512 VNNI's dot products where the
 * CPU has them: the same bits either way. */
int mc_q8_i8_rows_mm(const float *x, const int8_t *w, const float *d, float *y, int64_t M, int64_t N, int64_t K,
                     int threads, int vnni);

#endif
