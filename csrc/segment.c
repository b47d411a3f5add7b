/* Segments: create / attach / close / unlink POSIX shared memory, and layout. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ja_internal.h"
#include "jaxasync.h"

/* x rounded up to a multiple of JA_LINE; 0 on overflow (x is never 0 here). */
static uint64_t align_line(uint64_t x) {
    uint64_t y;
    if (__builtin_add_overflow(x, (uint64_t)JA_LINE - 1, &y)) return 0;
    return y & ~(uint64_t)(JA_LINE - 1);
}

/* Bytes of n slots, each a {seq, tag} line plus payload_bytes; 0 on overflow. */
static uint64_t slots_bytes(ja_header *h, uint64_t n) {
    uint64_t payload, stride, total;
    if (__builtin_mul_overflow(h->count, (uint64_t)h->itemsize, &payload)) return 0;
    if (!(stride = align_line(payload))) return 0;
    if (__builtin_add_overflow(stride, (uint64_t)JA_LINE, &stride)) return 0;
    if (__builtin_mul_overflow(stride, n, &total)) return 0;
    h->slot_stride = stride;
    return total;
}

uint64_t ja_layout(ja_header *h) {
    uint64_t data = 0, size;
    if (h->count == 0 || h->itemsize == 0 || h->ndim > JA_MAX_NDIM) {
        errno = EINVAL;
        return 0;
    }
    h->meta_offset = JA_META_OFFSET;
    h->slot_stride = 0;
    h->data_offset = h->meta_size ? align_line(JA_META_OFFSET + h->meta_size) : JA_META_OFFSET;
    switch (h->kind) {
    case JA_KIND_ATOMIC_ARRAY:
        if (__builtin_mul_overflow(h->count, (uint64_t)JA_LINE, &data)) data = 0;
        break;
    case JA_KIND_REGISTER:
        data = slots_bytes(h, JA_REGISTER_SLOTS);
        break;
    case JA_KIND_MAILBOX:
        if (!h->capacity) {
            errno = EINVAL;
            return 0;
        }
        data = slots_bytes(h, h->capacity);
        break;
    case JA_KIND_PARAM_BUFFER:
        if (h->itemsize != sizeof(float)) {
            errno = EINVAL;
            return 0;
        }
        if (!__builtin_mul_overflow(h->count, (uint64_t)sizeof(float), &data))
            data = align_line(data);
        break;
    default:
        errno = EINVAL;
        return 0;
    }
    if (!h->data_offset || !data || __builtin_add_overflow(h->data_offset, data, &size) ||
        size > (uint64_t)INT64_MAX || size > (uint64_t)SIZE_MAX) {
        errno = EOVERFLOW;
        return 0;
    }
    h->size = size;
    return size;
}

void *ja_segment_create(const char *name, const ja_header *spec, const void *meta) {
    ja_header h = *spec;
    uint64_t size = ja_layout(&h);
    if (!size) return NULL;

    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return NULL;
    /* Reserve every page now: on a full /dev/shm this fails with ENOSPC
     * instead of a SIGBUS at the first touch of an unbacked page. */
    int err = posix_fallocate(fd, 0, (off_t)size);
    void *base = MAP_FAILED;
    if (!err) {
        base = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED) err = errno;
    }
    close(fd);
    if (err) {
        shm_unlink(name);
        errno = err;
        return NULL;
    }

    /* The pages are zero (fresh tmpfs pages); fill the header except magic. */
    h.magic = 0;
    h.version = JA_LAYOUT_VERSION;
    h.creator_pid = (int64_t)getpid();
    memcpy(base, &h, sizeof h);
    if (h.meta_size) memcpy((char *)base + h.meta_offset, meta, h.meta_size);
    if (h.kind == JA_KIND_REGISTER) {
        /* Before the first write, readers get tag -1 and a zero vector. */
        for (uint64_t k = 0; k < JA_REGISTER_SLOTS; k++)
            atomic_store_explicit(&ja_slot_at(base, k)->tag, -1, memory_order_relaxed);
    }
    /* Release: orders every header and initialization store above before the
     * magic store, which attachers acquire-load in ja_header_magic_acquire. */
    atomic_store_explicit((_Atomic uint64_t *)base, (uint64_t)JA_MAGIC, memory_order_release);
    return base;
}

void *ja_segment_attach(const char *name, uint64_t *size) {
    struct stat st;
    *size = 0;
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) return NULL;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        errno = err;
        return NULL;
    }
    *size = (uint64_t)st.st_size;
    if (st.st_size < JA_HEADER_SIZE) {
        /* Too small to be a segment of ours (or its creator is mid-way). */
        close(fd);
        errno = EBADMSG;
        return NULL;
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (base == MAP_FAILED) {
        errno = err;
        return NULL;
    }
    return base;
}

uint64_t ja_header_magic_acquire(const ja_header *h) {
    /* Acquire: pairs with the creator's release store of magic, so the header
     * fields read after this are the creator's. */
    return atomic_load_explicit((_Atomic uint64_t *)&h->magic, memory_order_acquire);
}

int ja_segment_close(void *base, uint64_t size) { return munmap(base, (size_t)size); }

int ja_segment_unlink(const char *name) { return shm_unlink(name); }
