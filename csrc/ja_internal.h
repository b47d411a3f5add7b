/* Private helpers shared by the .c files in csrc/ (not part of the public API). */
#ifndef JA_INTERNAL_H
#define JA_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "jaxasync.h"

/* Only lock-free atomics work across processes: a lock-based fallback would
 * put its lock in process-private memory. */
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "32-bit atomics must be lock-free");
_Static_assert(sizeof(long long) == 8 && sizeof(int) == 4, "unexpected integer sizes");
_Static_assert(sizeof(_Atomic uint64_t) == 8 && sizeof(_Atomic int64_t) == 8,
               "atomic 64-bit words must have the plain layout");
_Static_assert(sizeof(_Atomic uint32_t) == sizeof(float), "float and its atomic pattern");
_Static_assert(sizeof(_Atomic uint64_t) == 2 * sizeof(float), "two floats per 64-bit word");
_Static_assert(sizeof(ja_header) <= JA_HEADER_SIZE, "header outgrew its reserved space");
_Static_assert(sizeof(((ja_header *)0)->shape) == JA_MAX_NDIM * sizeof(int64_t),
               "shape[] must hold JA_MAX_NDIM entries");

/* Control lines follow the header; each hot counter owns a 64-byte line so
 * the producer's and the consumer's counters never share a cache line. */
#define JA_CTRL_OFFSET JA_HEADER_SIZE
#define JA_CTRL_LINES 2
#define JA_META_OFFSET (JA_CTRL_OFFSET + JA_CTRL_LINES * JA_LINE)

static inline ja_header *ja_hdr(void *base) { return (ja_header *)base; }

/* Counter in control line k, viewed as an atomic 64-bit word. */
static inline _Atomic uint64_t *ja_ctrl_u64(const void *base, int k) {
    return (_Atomic uint64_t *)((char *)base + JA_CTRL_OFFSET + k * JA_LINE);
}

static inline _Atomic int64_t *ja_ctrl_i64(const void *base, int k) {
    return (_Atomic int64_t *)((char *)base + JA_CTRL_OFFSET + k * JA_LINE);
}

/* A slot (register or mailbox): a line {seq, tag} followed by the payload. */
typedef struct ja_slot {
    _Atomic uint64_t seq;
    _Atomic int64_t tag;
} ja_slot;

static inline ja_slot *ja_slot_at(void *base, uint64_t k) {
    const ja_header *h = ja_hdr(base);
    return (ja_slot *)((char *)base + h->data_offset + k * h->slot_stride);
}

static inline void *ja_slot_payload(ja_slot *s) { return (char *)s + JA_LINE; }

#endif /* JA_INTERNAL_H */
