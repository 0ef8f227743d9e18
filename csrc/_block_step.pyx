"""The compiled block step (block_step.c): a Llama block's decode step around its attention in two calls over the
int8-row kernels. Pointers come from the caller, who owns the tensors and checks their shapes; a layer is given as
(format, values, scales, outputs, inputs)."""

from libc.stdint cimport int64_t, uintptr_t


cdef extern from "block_step.h":
    int MC_ROWS_Q4
    int MC_ROWS_Q8
    ctypedef struct mc_rows_linear:
        int format
        const void *w
        const void *scales
        int64_t n
        int64_t k
    int mc_block_step_supported() nogil
    int mc_norm_linear(const float *x, const float *norm, float eps, const mc_rows_linear *layer, float *y,
                       int64_t rows, int threads, int vnni) nogil
    int mc_block_tail(const float *x, const float *attn, const mc_rows_linear *o, const float *norm, float eps,
                      const mc_rows_linear *gate_up, const mc_rows_linear *down, float *out, int64_t rows,
                      int threads, int vnni) nogil
    int mc_attend_block_tail(const float *x, const float *q, const float *k_pool, const float *v_pool,
                             const int64_t *tables, int64_t table_stride, int64_t block_size, int64_t num_blocks,
                             const int64_t *at, int64_t batch, int64_t kv_heads, int64_t q_rows, int64_t steps,
                             int64_t head_dim, int64_t ctx, const mc_rows_linear *o, const float *norm, float eps,
                             const mc_rows_linear *gate_up, const mc_rows_linear *down, float *out, int threads,
                             int vnni) nogil

Q4 = MC_ROWS_Q4
Q8 = MC_ROWS_Q8


cdef mc_rows_linear _layer(tuple spec):
    cdef mc_rows_linear layer
    layer.format = spec[0]
    layer.w = <const void *><uintptr_t>spec[1]
    layer.scales = <const void *><uintptr_t>spec[2]
    layer.n = spec[3]
    layer.k = spec[4]
    return layer


def supported() -> bool:
    """Whether this CPU runs the int8-row kernels (AVX2, FMA and F16C)."""
    return mc_block_step_supported() == 1


def norm_linear(uintptr_t x, uintptr_t norm, float eps, tuple layer, uintptr_t y, int64_t rows, int threads,
                bint vnni) -> None:
    """y = layer(rms_norm(x) * norm) (block_step.h), the GIL released."""
    cdef mc_rows_linear spec = _layer(layer)
    cdef int status
    with nogil:
        status = mc_norm_linear(<const float *>x, <const float *>norm, eps, &spec, <float *>y, rows, threads, vnni)
    if status != 0:
        raise MemoryError("block step kernel: no memory for the normalised rows")


def block_tail(uintptr_t x, uintptr_t attn, tuple o, uintptr_t norm, float eps, tuple gate_up, tuple down,
               uintptr_t out, int64_t rows, int threads, bint vnni) -> None:
    """out = a Llama block's step after its attention (block_step.h), the GIL released."""
    cdef mc_rows_linear o_spec = _layer(o), gate_up_spec = _layer(gate_up), down_spec = _layer(down)
    cdef int status
    with nogil:
        status = mc_block_tail(<const float *>x, <const float *>attn, &o_spec, <const float *>norm, eps,
                               &gate_up_spec, &down_spec, <float *>out, rows, threads, vnni)
    if status != 0:
        raise MemoryError("block step kernel: no memory for its intermediate rows")


def attend_block_tail(uintptr_t x, uintptr_t q, uintptr_t k_pool, uintptr_t v_pool, uintptr_t tables,
                      int64_t table_stride, int64_t block_size, int64_t num_blocks, uintptr_t at, int64_t batch,
                      int64_t kv_heads, int64_t q_rows, int64_t steps, int64_t head_dim, int64_t ctx, tuple o,
                      uintptr_t norm, float eps, tuple gate_up, tuple down, uintptr_t out, int threads,
                      bint vnni) -> None:
    """out = a Llama block's step after its attention over a paged cache, the attention included (block_step.h),
    the GIL released."""
    cdef mc_rows_linear o_spec = _layer(o), gate_up_spec = _layer(gate_up), down_spec = _layer(down)
    cdef int status
    with nogil:
        status = mc_attend_block_tail(<const float *>x, <const float *>q, <const float *>k_pool,
                                      <const float *>v_pool, <const int64_t *>tables, table_stride, block_size,
                                      num_blocks, <const int64_t *>at, batch, kv_heads, q_rows, steps, head_dim, ctx,
                                      &o_spec, <const float *>norm, eps, &gate_up_spec, &down_spec, <float *>out,
                                      threads, vnni)
    if status == -2:
        raise ValueError(f"block step: a block table entry lies outside the pool's {num_blocks} blocks")
    if status != 0:
        raise MemoryError("block step kernel: no memory for its attention and intermediate rows")
