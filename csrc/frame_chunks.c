/* See frame_chunks.h. A block the cache keeps came from the allocator it replaced, and every block it does not keep
 * goes back to that allocator, so blocks mapped before the install are freed correctly. A reused block is not
 * zeroed: CPython's arena users initialise what they use (its malloc-backed arenas are not zeroed either). */
#include <Python.h>

#include "frame_chunks.h"

static PyObjectArenaAllocator previous;
static int installed;
static struct {
    void *ptr;
    size_t size;
} kept[MC_FRAME_CHUNKS_KEPT];
static int count;

static void *cached_alloc(void *ctx, size_t size) {
    (void)ctx;
    for (int i = count - 1; i >= 0; i--) {
        if (kept[i].size == size) {
            void *ptr = kept[i].ptr;
            kept[i] = kept[--count];
            return ptr;
        }
    }
    return previous.alloc(previous.ctx, size);
}

static void cached_free(void *ctx, void *ptr, size_t size) {
    (void)ctx;
    if (size <= MC_FRAME_CHUNK_MAX && count < MC_FRAME_CHUNKS_KEPT) {
        kept[count].ptr = ptr;
        kept[count].size = size;
        count++;
        return;
    }
    previous.free(previous.ctx, ptr, size);
}

int mc_frame_chunks_install(void) {
    if (installed) return 0;
    PyObject_GetArenaAllocator(&previous);
    PyObjectArenaAllocator cache = {NULL, cached_alloc, cached_free};
    PyObject_SetArenaAllocator(&cache);
    installed = 1;
    return 1;
}

int mc_frame_chunks_kept(void) { return count; }
