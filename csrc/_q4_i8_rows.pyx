"""The compiled Q4 x int8 row kernel (q4_i8_rows.c): a GGUF file's Q4_0 and Q4_1 blocks times rows quantized to
int8 per block, each row's result independent of its batch. Pointers come from the caller, who owns the tensors and
checks their shapes."""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uintptr_t


cdef extern from "q4_i8_rows.h":
    int mc_q4_i8_rows_supported() nogil
    int mc_q4_i8_rows_vnni_supported() nogil
    int mc_q4_i8_rows_mm(const float *x, const uint8_t *w, const uint16_t *dm, float *y, int64_t M, int64_t N,
                         int64_t K, int threads, int vnni) nogil


def supported() -> bool:
    """Whether this CPU runs the kernel (AVX2, FMA and F16C)."""
    return mc_q4_i8_rows_supported() == 1


def vnni_supported() -> bool:
    """Whether this CPU also has AVX-512 VNNI, whose dot products the kernel can take (the same bits)."""
    return mc_q4_i8_rows_vnni_supported() == 1


def mm(uintptr_t x, uintptr_t w, uintptr_t dm, uintptr_t y, int64_t rows, int64_t n, int64_t k, int threads,
       bint vnni) -> None:
    """y[rows, n] = x[rows, k], quantized to int8 per block, times the Q4 weights laid out in groups of 8 outputs in
    w with their float16 scales and minimums in dm (see q4_i8_rows.h), the GIL released."""
    cdef int status
    with nogil:
        status = mc_q4_i8_rows_mm(<const float *>x, <const uint8_t *>w, <const uint16_t *>dm, <float *>y, rows, n, k,
                                  threads, vnni)
    if status != 0:
        raise MemoryError("Q4 x int8 row kernel: no memory for the quantized rows")
