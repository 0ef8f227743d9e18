"""The compiled int4 row kernel (int4_rows.c): torch's AVX-512 int4 product, row for row, with each weight
dequantized once per call. Pointers come from the caller, who owns the tensors and checks their shapes."""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uintptr_t


cdef extern from "int4_rows.h":
    int mc_int4_rows_supported() nogil
    int mc_int4_rows_mm(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M,
                        int64_t N, int64_t K, int64_t group, int threads) nogil


def supported() -> bool:
    """Whether this CPU runs the kernel (AVX-512 F and BW)."""
    return mc_int4_rows_supported() == 1


def mm(uintptr_t x, uintptr_t w, uintptr_t sz, uintptr_t y, int64_t m, int64_t n, int64_t k, int64_t group,
       int threads) -> None:
    """y[m, n] = x[m, k] times the packed weights w with scales and zeros sz (see int4_rows.h), the GIL
    released."""
    cdef int status
    with nogil:
        status = mc_int4_rows_mm(<const uint16_t *>x, <const uint8_t *>w, <const uint16_t *>sz, <uint16_t *>y,
                                 m, n, k, group, threads)
    if status != 0:
        raise MemoryError("int4 row kernel: no memory for its scratch buffers")
