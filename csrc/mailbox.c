/* Bounded single-producer single-consumer ring of fixed-size messages.
 *
 * Control line 0 holds tail (messages ever sent, written only by the
 * producer), line 1 holds head (messages ever received, written only by the
 * consumer); they live on separate 64-byte lines so the two processes do not
 * false-share. Message k is in slot k % capacity.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "ja_internal.h"
#include "jaxasync.h"

int ja_mailbox_send(void *base, const void *src, int64_t tag) {
    const ja_header *h = ja_hdr(base);
    _Atomic uint64_t *tail = ja_ctrl_u64(base, 0), *head = ja_ctrl_u64(base, 1);
    /* Relaxed: only this producer stores tail. */
    uint64_t t = atomic_load_explicit(tail, memory_order_relaxed);
    /* Acquire: pairs with the consumer's release store of head, so its copy
     * out of the slot we are about to reuse is finished. */
    uint64_t hd = atomic_load_explicit(head, memory_order_acquire);
    if (t - hd >= h->capacity) return 0;
    ja_slot *s = ja_slot_at(base, t % h->capacity);
    atomic_store_explicit(&s->tag, tag, memory_order_relaxed);
    memcpy(ja_slot_payload(s), src, h->count * h->itemsize);
    /* Release: the tag and payload stores above happen before the consumer's
     * acquire load that sees this tail. */
    atomic_store_explicit(tail, t + 1, memory_order_release);
    return 1;
}

int ja_mailbox_recv(void *base, void *dst, int64_t *tag) {
    const ja_header *h = ja_hdr(base);
    _Atomic uint64_t *tail = ja_ctrl_u64(base, 0), *head = ja_ctrl_u64(base, 1);
    /* Relaxed: only this consumer stores head. */
    uint64_t hd = atomic_load_explicit(head, memory_order_relaxed);
    /* Acquire: pairs with the producer's release store of tail, so the
     * message's tag and payload are visible. */
    uint64_t t = atomic_load_explicit(tail, memory_order_acquire);
    if (hd == t) return 0;
    ja_slot *s = ja_slot_at(base, hd % h->capacity);
    *tag = atomic_load_explicit(&s->tag, memory_order_relaxed);
    memcpy(dst, ja_slot_payload(s), h->count * h->itemsize);
    /* Release: the loads above complete before the producer can see the slot
     * as free and overwrite it. */
    atomic_store_explicit(head, hd + 1, memory_order_release);
    return 1;
}

uint64_t ja_mailbox_size(const void *base) {
    /* Acquire both counters; head first, so head <= tail in the snapshot. */
    uint64_t hd = atomic_load_explicit(ja_ctrl_u64(base, 1), memory_order_acquire);
    uint64_t t = atomic_load_explicit(ja_ctrl_u64(base, 0), memory_order_acquire);
    return t - hd;
}
