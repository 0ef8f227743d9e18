/* CPython 3.11 and later keep a thread's frames in chunks of at least 16 KiB taken from the object arena allocator
 * (mmap) and hand a chunk back (munmap) as soon as the last frame in it returns. A call made, again and again, from
 * a frame that ends near a chunk's end (a custom op's body inside a compiled decode step, deep in the model
 * thread's stack) then costs an mmap, a page fault and an munmap each time: measured at about 10 us per call, and
 * twice a decode step's own time in the engine. These functions put a small cache in front of that allocator.
 * Called with the GIL held (the allocator's own contract); not for free-threaded builds. */
#ifndef MINERCORE_FRAME_CHUNKS_H
#define MINERCORE_FRAME_CHUNKS_H

#include <stddef.h>

/* Puts the cache in front of the arena allocator: it keeps up to MC_FRAME_CHUNKS_KEPT freed blocks of at most
 * MC_FRAME_CHUNK_MAX bytes (frame chunks; the object arenas are larger and pass straight through) and hands them out
 * again for requests of the same size. Idempotent. Returns 1 if it installed the cache now, 0 if it already was. */
int mc_frame_chunks_install(void);

/* How many freed blocks the cache holds now (0 before install). */
int mc_frame_chunks_kept(void);

#define MC_FRAME_CHUNKS_KEPT 8
#define MC_FRAME_CHUNK_MAX (64 * 1024)

#endif
