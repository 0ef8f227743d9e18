/* Weight-only product over a GGUF file's Q4_0 and Q4_1 blocks as they are, for float32 activations on a CPU with
 * AVX2 and FMA (where torch's int4 kernel wants bfloat16 activations, which such a CPU converts in software).
 * Every output is the same sequence of float32 operations whatever the row count, the rows sharing a call or the
 * thread count (rows_tile.h), so a row's logits do not depend on the batch it is in. */
#ifndef MINERCORE_Q4_ROWS_H
#define MINERCORE_Q4_ROWS_H

#include <stdint.h>

/* 1 where this CPU runs the kernel (AVX2, FMA and F16C), else 0. */
int mc_q4_rows_supported(void);

/* y[M, N] (float32) = x[M, K] (float32, rows K apart) times W^T, W[n, k] = d * q[n, k] + m rounded once to
 * float32, with (d, m) the scale and minimum of the block holding k (a Q4_1 block's w = d q + m; Q4_0's d (q - 8)
 * is m = -8 d, exact). q holds the values 0..15 packed as in a GGUF block: [N, K / 2] bytes, block b of row n at
 * byte 16 b, whose byte j holds value 32 b + j in its low nibble and 32 b + j + 16 in its high one. dm is
 * [N, K / 32, 2] float16 bits, each block's (d, m) as the file holds them. K must be a multiple of 32. Returns 0,
 * or -1 when scratch memory could not be allocated (y is then unspecified). */
int mc_q4_rows_mm(const float *x, const uint8_t *q, const uint16_t *dm, float *y, int64_t M, int64_t N, int64_t K,
                  int threads);

#endif
