"""The compiled Q8_0 row kernel (q8_rows.c): a GGUF file's Q8_0 blocks times float32 rows, the same float32
operations for every output whatever the batch. Pointers come from the caller, who owns the tensors and checks
their shapes."""

from libc.stdint cimport int8_t, int64_t, uintptr_t


cdef extern from "q8_rows.h":
    int mc_q8_rows_supported() nogil
    int mc_q8_rows_mm(const float *x, const int8_t *q, const float *d, float *y, int64_t M, int64_t N, int64_t K,
                      int threads) nogil


def supported() -> bool:
    """Whether this CPU runs the kernel (AVX2, FMA and F16C)."""
    return mc_q8_rows_supported() == 1


def mm(uintptr_t x, uintptr_t q, uintptr_t d, uintptr_t y, int64_t m, int64_t n, int64_t k, int threads) -> None:
    """y[m, n] = x[m, k] times the Q8_0 weights q [n, k] with block scales d [n, k / 32] (see q8_rows.h), the GIL
    released."""
    cdef int status
    with nogil:
        status = mc_q8_rows_mm(<const float *>x, <const int8_t *>q, <const float *>d, <float *>y, m, n, k, threads)
    if status != 0:
        raise MemoryError("Q8_0 row kernel: no memory for its scratch tile")
