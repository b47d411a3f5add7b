/* Single-writer multi-reader vector register over JA_REGISTER_SLOTS versioned slots.
 *
 * Control line 0 holds the published version w (0 before the first write);
 * version w lives in slot w % JA_REGISTER_SLOTS. A slot's seq is 2w once version
 * w is complete in it and 2w - 1 while the writer fills it.
 *
 * The writer fills the slot of version w + 1, which is never the published
 * one, then publishes w + 1 with one release store: it never waits, and if it
 * dies mid-write it has only touched an unpublished slot, so readers keep
 * getting version w. A reader acquire-loads w, copies slot w, and re-checks
 * that the slot's seq is still 2w; it retries only when the writer lapped it
 * (started version w + JA_REGISTER_SLOTS in that slot) during the copy. The
 * payload copies themselves are plain memcpy: a racing copy may read a mix of
 * versions, but the re-check then rejects it (the seqlock idiom).
 */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "ja_internal.h"
#include "jaxasync.h"

void ja_register_write(void *base, const void *src, int64_t tag) {
    const ja_header *h = ja_hdr(base);
    _Atomic uint64_t *pub = ja_ctrl_u64(base, 0);
    /* Relaxed: the single writer reads back its own last store. */
    uint64_t w = atomic_load_explicit(pub, memory_order_relaxed) + 1;
    ja_slot *s = ja_slot_at(base, w % JA_REGISTER_SLOTS);

    atomic_store_explicit(&s->seq, 2 * w - 1, memory_order_relaxed);
    /* Release fence: orders the odd seq store above before the tag and payload
     * stores below. A reader whose copy sees any of the new bytes then sees an
     * odd (or newer) seq on its re-check and retries. */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&s->tag, tag, memory_order_relaxed);
    memcpy(ja_slot_payload(s), src, h->count * h->itemsize);
    atomic_store_explicit(&s->seq, 2 * w, memory_order_relaxed);
    /* Release: the tag, payload and seq stores above happen before any read
     * that acquires this version. */
    atomic_store_explicit(pub, w, memory_order_release);
}

int64_t ja_register_read(void *base, void *dst) {
    const ja_header *h = ja_hdr(base);
    _Atomic uint64_t *pub = ja_ctrl_u64(base, 0);
    size_t nbytes = h->count * h->itemsize;
    for (;;) {
        /* Acquire: pairs with the writer's release store of pub, so slot w holds
         * the complete version w (unless lapped, which the re-check detects). */
        uint64_t w = atomic_load_explicit(pub, memory_order_acquire);
        ja_slot *s = ja_slot_at(base, w % JA_REGISTER_SLOTS);
        int64_t tag = atomic_load_explicit(&s->tag, memory_order_relaxed);
        memcpy(dst, ja_slot_payload(s), nbytes);
        /* Acquire fence: orders the tag and payload loads above before the seq
         * re-check below (pairs with the writer's release fence). */
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&s->seq, memory_order_relaxed) == 2 * w) return tag;
    }
}

uint64_t ja_register_version_relaxed(const void *base) {
    return atomic_load_explicit(ja_ctrl_u64(base, 0), memory_order_relaxed);
}
