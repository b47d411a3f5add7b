/* Flat float32 parameter buffer: dense and sparse add in three modes, gather,
 * and the shared step counter (control line 0).
 *
 * racy     plain loads and stores; gcc vectorizes the dense loop (with AVX2 and
 *          AVX-512 clones chosen at load time on x86-64 glibc, so the module
 *          still runs on any x86-64). Concurrent adds to one element may lose
 *          updates (true Hogwild).
 * relaxed  every element is read and written by relaxed atomic accesses: no
 *          torn element, concurrent updates may still be lost. Dense adds use
 *          64-bit accesses that cover two elements, both of which this add
 *          updates anyway; sparse adds use 32-bit accesses.
 * atomic   relaxed compare-exchange loop on the 32-bit pattern: no lost
 *          update. (An explicit CAS on uint32 needs no libatomic, unlike an
 *          RMW on _Atomic float.)
 * None of the modes orders the buffer with anything else; the step counter's
 * seq_cst fetch_add does (a process's adds happen before its next_step).
 */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "ja_internal.h"
#include "jaxasync.h"

static inline float from_bits(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline uint32_t to_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

static inline void add_relaxed1(float *p, float v) {
    _Atomic uint32_t *a = (_Atomic uint32_t *)p;
    uint32_t old = atomic_load_explicit(a, memory_order_relaxed);
    atomic_store_explicit(a, to_bits(from_bits(old) + v), memory_order_relaxed);
}

static inline void add_atomic1(float *p, float v) {
    _Atomic uint32_t *a = (_Atomic uint32_t *)p;
    uint32_t old = atomic_load_explicit(a, memory_order_relaxed);
    /* On failure old is reloaded; comparing bit patterns also ends on NaN. */
    while (!atomic_compare_exchange_weak_explicit(a, &old, to_bits(from_bits(old) + v),
                                                  memory_order_relaxed, memory_order_relaxed)) {
    }
}

#if defined(__x86_64__) && defined(__GLIBC__)
#define JA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JA_SIMD_CLONES
#endif

JA_SIMD_CLONES
static void add_racy(float *restrict dst, const float *restrict src, uint64_t n, float scale) {
    for (uint64_t i = 0; i < n; i++) dst[i] += scale * src[i];
}

/* Relaxed dense add, two elements per relaxed 64-bit load and store (twice the
 * throughput of 32-bit accesses; gcc never vectorizes atomics). */
static void add_relaxed(float *dst, const float *src, uint64_t n, float scale) {
    uint64_t i = 0;
    if (n && ((uintptr_t)dst & 7)) {  /* align dst to 8 bytes */
        add_relaxed1(dst, scale * src[0]);
        i = 1;
    }
    _Atomic uint64_t *w = (_Atomic uint64_t *)(dst + i);
    uint64_t pairs = (n - i) / 2;
    for (uint64_t k = 0; k < pairs; k++, i += 2) {
        uint64_t bits = atomic_load_explicit(w + k, memory_order_relaxed);
        float f[2];
        memcpy(f, &bits, sizeof bits);
        f[0] += scale * src[i];
        f[1] += scale * src[i + 1];
        memcpy(&bits, f, sizeof bits);
        atomic_store_explicit(w + k, bits, memory_order_relaxed);
    }
    if (i < n) add_relaxed1(dst + i, scale * src[i]);
}

void ja_f32_add(float *dst, const float *src, uint64_t n, float scale, int mode) {
    if (mode == JA_ADD_RACY) {
        add_racy(dst, src, n, scale);
    } else if (mode == JA_ADD_RELAXED) {
        add_relaxed(dst, src, n, scale);
    } else {
        for (uint64_t i = 0; i < n; i++) add_atomic1(dst + i, scale * src[i]);
    }
}

void ja_f32_add_segments(float *dst, const float *src, const int64_t *seg, uint64_t nseg,
                         float scale, int mode) {
    for (uint64_t k = 0; k < nseg; k++) {
        uint64_t n = (uint64_t)seg[2 * k + 1];
        ja_f32_add(dst + seg[2 * k], src, n, scale, mode);
        src += n;
    }
}

/* One body for both index widths; the mode is chosen outside the loops. */
#define JA_SPARSE_BODY                                                         \
    if (mode == JA_ADD_RACY) {                                                 \
        for (uint64_t k = 0; k < n; k++) dst[idx[k]] += scale * val[k];        \
    } else if (mode == JA_ADD_RELAXED) {                                       \
        for (uint64_t k = 0; k < n; k++) add_relaxed1(dst + idx[k], scale * val[k]); \
    } else {                                                                   \
        for (uint64_t k = 0; k < n; k++) add_atomic1(dst + idx[k], scale * val[k]); \
    }

void ja_f32_add_sparse_i32(float *dst, const int32_t *idx, const float *val, uint64_t n,
                           float scale, int mode) {
    JA_SPARSE_BODY
}

void ja_f32_add_sparse_i64(float *dst, const int64_t *idx, const float *val, uint64_t n,
                           float scale, int mode) {
    JA_SPARSE_BODY
}

void ja_f32_gather_segments(float *dst, const float *src, const int64_t *seg, uint64_t nseg) {
    for (uint64_t k = 0; k < nseg; k++) {
        size_t n = (size_t)seg[2 * k + 1];
        memcpy(dst, src + seg[2 * k], n * sizeof(float));
        dst += n;
    }
}

int64_t ja_step_fetch_add(void *base, int64_t d) {
    return atomic_fetch_add(ja_ctrl_i64(base, 0), d);
}

int64_t ja_step_load(const void *base) { return atomic_load(ja_ctrl_i64(base, 0)); }
