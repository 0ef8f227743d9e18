"""The compiled step attention (step_attention.c): a decode or verify step's attention over the KV cache, each
query's result independent of the rest of the call. Pointers come from the caller, who owns the tensors and checks
their shapes."""

from libc.stdint cimport int64_t, uintptr_t


cdef extern from "step_attention.h":
    int mc_step_attention_supported() nogil
    int mc_step_attention(const float *q, const float *k, const float *v, const int64_t *at, float *out, int64_t B,
                          int64_t H, int64_t R, int64_t T, int64_t D, int64_t ctx, int64_t k_batch, int64_t k_head,
                          int64_t v_batch, int64_t v_head, const int64_t *tables, int64_t table_stride,
                          int64_t block_size, int64_t num_blocks, float scale, int threads) nogil


def supported() -> bool:
    """Whether this CPU runs the kernel (AVX2, FMA and F16C)."""
    return mc_step_attention_supported() == 1


def attend(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t at, uintptr_t out, int64_t batch, int64_t heads,
           int64_t rows, int64_t width, int64_t dim, int64_t ctx, int64_t k_batch, int64_t k_head, int64_t v_batch,
           int64_t v_head, uintptr_t tables, int64_t table_stride, int64_t block_size, int64_t num_blocks,
           float scale, int threads) -> None:
    """out = the step's attention (see step_attention.h for the layouts and the sequence of operations; tables 0:
    contiguous positions, else a block table over pools), the GIL released."""
    cdef int status
    with nogil:
        status = mc_step_attention(<const float *>q, <const float *>k, <const float *>v, <const int64_t *>at,
                                   <float *>out, batch, heads, rows, width, dim, ctx, k_batch, k_head, v_batch,
                                   v_head, <const int64_t *>tables, table_stride, block_size, num_blocks, scale,
                                   threads)
    if status == -2:
        raise ValueError(f"step attention kernel: a block table entry lies outside the pool's {num_blocks} blocks")
    if status != 0:
        raise MemoryError("step attention kernel: no memory for its scores")
