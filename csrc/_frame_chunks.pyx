"""A cache in front of CPython's arena allocator, so that calls at a frame-chunk boundary stop mapping and unmapping
memory each time (frame_chunks.h)."""


cdef extern from "frame_chunks.h":
    int mc_frame_chunks_install()
    int mc_frame_chunks_kept()


def install() -> bool:
    """Put the cache in place (the GIL is held here, as the allocator requires); True if this call did."""
    return mc_frame_chunks_install() == 1


def kept() -> int:
    """How many freed blocks the cache holds now."""
    return mc_frame_chunks_kept()
