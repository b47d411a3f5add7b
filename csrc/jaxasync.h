/* jaxasync native shared-memory core: the one public header.
 *
 * Everything between the cdef-begin and cdef-end markers is also the cffi cdef
 * (jaxasync/_src/native_build.py strips the preprocessor lines and turns each
 * integer #define into "#define NAME ..."), so keep that region plain C that
 * cffi parses: no _Atomic, no macros with arguments, no inline code.
 *
 * Segment layout (all offsets from the mapping base, all 64-byte aligned):
 *
 *   0    ja_header (256 bytes)
 *   256  control line 0: published version (register) | tail (mailbox) | step (params)
 *   320  control line 1: head (mailbox)
 *   384  meta area (meta_size bytes, e.g. the pickled pytree structure)
 *   data_offset  kind-specific data:
 *        atomic array  count cells, one per 64-byte line
 *        register      JA_REGISTER_SLOTS slots of slot_stride bytes
 *        mailbox       capacity slots of slot_stride bytes
 *        param buffer  count float32 values
 *   A slot is a 64-byte line {uint64 seq, int64 tag} followed by the payload.
 *
 * Conventions: every symbol starts with ja_; the memory order of each
 * operation is in its name or its comment; setup and teardown return NULL or
 * -1 and set errno; operations on mapped memory never allocate and never fail
 * (the Python wrappers check dtype, shape, contiguity and bounds first).
 */
#ifndef JAXASYNC_H
#define JAXASYNC_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin */

#define JA_MAGIC 0x434e59534158414a  /* "JAXASYNC" in little-endian byte order */
#define JA_LAYOUT_VERSION 1
#define JA_HEADER_SIZE 256
#define JA_LINE 64
#define JA_MAX_NDIM 8
#define JA_REGISTER_SLOTS 3

#define JA_KIND_ATOMIC_ARRAY 1
#define JA_KIND_REGISTER 2
#define JA_KIND_PARAM_BUFFER 3
#define JA_KIND_MAILBOX 4

#define JA_ADD_RACY 0
#define JA_ADD_RELAXED 1
#define JA_ADD_ATOMIC 2

/* The segment header. The caller of ja_segment_create fills kind, dtype,
 * itemsize, ndim, shape, count, capacity and meta_size; the library fills the
 * rest (magic last, with a release store, so an attacher that sees the magic
 * sees a complete header). */
typedef struct ja_header {
    uint64_t magic;         /* JA_MAGIC once initialized */
    uint32_t version;       /* JA_LAYOUT_VERSION */
    uint32_t kind;          /* JA_KIND_* */
    uint32_t dtype;         /* element type code, owned by the Python layer */
    uint32_t itemsize;      /* bytes per element */
    uint32_t ndim;
    uint32_t reserved;
    int64_t shape[8];       /* JA_MAX_NDIM */
    int64_t creator_pid;
    uint64_t size;          /* bytes in the whole segment */
    uint64_t count;         /* cells, elements per vector or message, floats */
    uint64_t capacity;      /* mailbox slots */
    uint64_t slot_stride;   /* bytes per register or mailbox slot */
    uint64_t meta_offset;
    uint64_t meta_size;
    uint64_t data_offset;
} ja_header;

/* ---- segments (setup and teardown: NULL / -1 with errno on failure) ---- */

/* Fills the layout fields of *h and returns the segment size in bytes, or 0
 * with errno = EINVAL / EOVERFLOW. */
uint64_t ja_layout(ja_header *h);

/* Creates the POSIX shared-memory object `name` (O_EXCL), reserves its space
 * with posix_fallocate (a full /dev/shm is ENOSPC here, not a SIGBUS later),
 * maps it, writes the header and h->meta_size bytes of meta, and returns the
 * base. Nothing is left behind on failure. */
void *ja_segment_create(const char *name, const ja_header *h, const void *meta);

/* Maps an existing segment read-write; stores its size in *size. */
void *ja_segment_attach(const char *name, uint64_t *size);

/* Acquire-loads the magic word (pairs with the creator's release store). */
uint64_t ja_header_magic_acquire(const ja_header *h);

/* Unmaps a mapping returned by ja_segment_create / ja_segment_attach. */
int ja_segment_close(void *base, uint64_t size);

/* Removes the name; existing mappings stay valid until closed. */
int ja_segment_unlink(const char *name);

/* ---- atomic array: int64 cells, each on its own 64-byte line; seq_cst ---- */

int64_t ja_atomic_load(void *base, uint64_t i);
void ja_atomic_store(void *base, uint64_t i, int64_t v);
int64_t ja_atomic_fetch_add(void *base, uint64_t i, int64_t d);
/* Strong CAS; returns the value seen, which equals expected iff the cell
 * was set to desired. */
int64_t ja_atomic_compare_exchange(void *base, uint64_t i, int64_t expected, int64_t desired);

/* ---- single-writer multi-reader vector register ---- */

/* Wait-free for the one writer: fills an unpublished slot, then publishes it
 * with one release store. */
void ja_register_write(void *base, const void *src, int64_t tag);
/* Copies the last published value into dst and returns its tag. The
 * published index is acquire-loaded; the copy is retried only if the writer
 * lapped the slot during the copy (lock-free, never blocked by a dead writer). */
int64_t ja_register_read(void *base, void *dst);
/* Relaxed load of the published version (0 before the first write). */
uint64_t ja_register_version_relaxed(const void *base);

/* ---- parameter buffer (flat float32) ---- */

/* dst[i] += scale * src[i] for i < n, in mode JA_ADD_*:
 * racy: plain loads and stores (vectorized; concurrent updates may be lost);
 * relaxed: relaxed 32-bit atomic load and store per element (no torn element);
 * atomic: relaxed compare-exchange loop on the 32-bit pattern (no lost update). */
void ja_f32_add(float *dst, const float *src, uint64_t n, float scale, int mode);
/* The same over segments: for k < nseg, the next seg[2k+1] values of src go to
 * dst + seg[2k]. Lets one call update a pytree laid out with padding. */
void ja_f32_add_segments(float *dst, const float *src, const int64_t *seg, uint64_t nseg,
                         float scale, int mode);
/* dst[idx[k]] += scale * val[k] for k < n; indices are already bounds-checked. */
void ja_f32_add_sparse_i32(float *dst, const int32_t *idx, const float *val, uint64_t n,
                           float scale, int mode);
void ja_f32_add_sparse_i64(float *dst, const int64_t *idx, const float *val, uint64_t n,
                           float scale, int mode);
/* Copies segments of src (laid out as in ja_f32_add_segments) into a dense dst;
 * plain loads, so elements may come from different moments. */
void ja_f32_gather_segments(float *dst, const float *src, const int64_t *seg, uint64_t nseg);
/* The step counter: seq_cst fetch_add (returns the old value) and load. */
int64_t ja_step_fetch_add(void *base, int64_t d);
int64_t ja_step_load(const void *base);

/* ---- single-producer single-consumer mailbox ---- */

/* Returns 0 when full. Acquire-loads head, release-stores tail. */
int ja_mailbox_send(void *base, const void *src, int64_t tag);
/* Returns 0 when empty. Acquire-loads tail, copies, release-stores head. */
int ja_mailbox_recv(void *base, void *dst, int64_t *tag);
/* Messages waiting (acquire loads; a snapshot that may be stale at once). */
uint64_t ja_mailbox_size(const void *base);

/* cdef-end */

#endif /* JAXASYNC_H */
