/* A decode or verify step's attention over the KV cache on a CPU, each query's result computed by the same float32
 * operations whatever else the call holds: its batch, its context bucket, the other positions of a verify step and
 * the thread count change no bit of it. Matrix-product libraries round a row differently among more rows (MKL's
 * sgemm takes another path below 4 rows), and torch's CPU flash attention differently in a batch of 8 than alone. */
#ifndef MINERCORE_STEP_ATTENTION_H
#define MINERCORE_STEP_ATTENTION_H

#include <stdint.h>

/* 1 where this CPU runs the kernel (AVX2, FMA and F16C), else 0. */
int mc_step_attention_supported(void);

/* out[b, h, r] for B batch rows, H KV heads and R = G T query rows per head, row r = g T + j being query head g of
 * the head's group at the step's position j: softmax over positions p <= min(at[b, j], ctx - 1) of scale * dot(q[b,
 * h, r], k[b, h, p]), weighting v[b, h, p]. q and out are contiguous [B, H, R, D]; k and v hold a position's D values
 * contiguously, positions D apart, with the given batch and head strides (in floats); at is [B, T]. With a block
 * table (tables not NULL, [B, table_stride] block ids), k and v are instead pools of blocks of block_size positions,
 * k_batch / v_batch floats apart (a block holds each head's positions, k_head / v_head apart), and position p of
 * batch row b lies at position p % block_size of block tables[b, p / block_size]: the same values in the same order
 * as in a contiguous copy, so the same bits. For each query: the dot products in one fixed order over D (8 lanes,
 * then those lanes summed in a fixed tree), times scale; the maximum; exp(s - max) and their sum in position order;
 * each weight divided by the sum; the weighted values summed in position order. A query with no visible position (at
 * < 0) gets zeros. With a table, every entry a query can reach (the first ceil(ctx / block_size) of each row) must
 * lie in [0, num_blocks). Returns 0; -1 when scratch memory could not be allocated, -2 for a table entry outside the
 * pool (out is then unspecified).
 */
int mc_step_attention(const float *q, const float *k, const float *v, const int64_t *at, float *out, int64_t B,
                      int64_t H, int64_t R, int64_t T, int64_t D, int64_t ctx, int64_t k_batch, int64_t k_head,
                      int64_t v_batch, int64_t v_head, const int64_t *tables, int64_t table_stride,
                      int64_t block_size, int64_t num_blocks, float scale, int threads);

#endif
