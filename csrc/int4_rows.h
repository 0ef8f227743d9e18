/* Weight-only int4 matrix product over torch's AVX-512 CPU packing, computing each output row exactly as
 * torch's own kernel does (aten/src/ATen/native/cpu/int4mm_kernel.cpp, AVX-512 path), but dequantizing each
 * weight once for all rows instead of once per four. */
#ifndef MINERCORE_INT4_ROWS_H
#define MINERCORE_INT4_ROWS_H

#include <stdint.h>

/* 1 where this CPU runs the kernel (AVX-512 F and BW), else 0. */
int mc_int4_rows_supported(void);

/* y[M, N] (bfloat16) = x[M, K] (bfloat16) times the int4 weights w (torch's AVX-512 packing of an [N, K] int4
 * matrix: N / 64 blocks of K rows of 32 bytes), with sz[K / group, N, 2] (bfloat16 scale and zero) per group of
 * ``group`` inputs. N must be a multiple of 64 and K of ``group``. Returns 0, or -1 when scratch memory could
 * not be allocated (y is then unspecified). */
int mc_int4_rows_mm(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t N,
                    int64_t K, int64_t group, int threads);

#endif
