/* Atomic array: int64 cells, each on its own 64-byte line. Every operation is
 * seq_cst, so all processes agree on one order of all operations on all cells. */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <stdint.h>

#include "ja_internal.h"
#include "jaxasync.h"

static inline _Atomic int64_t *cell(void *base, uint64_t i) {
    return (_Atomic int64_t *)((char *)base + ja_hdr(base)->data_offset + i * JA_LINE);
}

int64_t ja_atomic_load(void *base, uint64_t i) { return atomic_load(cell(base, i)); }

void ja_atomic_store(void *base, uint64_t i, int64_t v) { atomic_store(cell(base, i), v); }

int64_t ja_atomic_fetch_add(void *base, uint64_t i, int64_t d) {
    return atomic_fetch_add(cell(base, i), d);
}

int64_t ja_atomic_compare_exchange(void *base, uint64_t i, int64_t expected, int64_t desired) {
    /* Strong: fails only if the cell really differs, so "seen == expected"
     * means success; on failure expected is overwritten with the value seen. */
    atomic_compare_exchange_strong(cell(base, i), &expected, desired);
    return expected;
}
