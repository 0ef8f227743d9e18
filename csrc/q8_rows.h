/* Weight-only product over a GGUF file's Q8_0 blocks as they are, for float32 activations on a CPU with AVX2 and
 * FMA (where torch has no fast int8 kernel for float32 inputs and bfloat16 is converted in software). Every output
 * is computed by the same sequence of float32 operations whatever the row count, the rows sharing a call or the
 * thread count, so a row's logits do not depend on the batch it is in. */
#ifndef MINERCORE_Q8_ROWS_H
#define MINERCORE_Q8_ROWS_H

#include <stdint.h>

/* 1 where this CPU runs the kernel (AVX2, FMA and F16C), else 0. */
int mc_q8_rows_supported(void);

/* y[M, N] (float32) = x[M, K] (float32, rows K apart) times W^T, W[n, k] = d[n, k / 32] * q[n, k]: q is [N, K]
 * int8, d is [N, K / 32] float32 (a Q8_0 block's float16 scale, widened; its product with q is exact in float32).
 * K must be a multiple of 32. Returns 0, or -1 when scratch memory could not be allocated (y is then
 * unspecified). */
int mc_q8_rows_mm(const float *x, const int8_t *q, const float *d, float *y, int64_t M, int64_t N, int64_t K,
                  int threads);

#endif
