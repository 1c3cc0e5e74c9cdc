/* The embedded key cache's table: redis_module/keytable.h behind a C ABI for ctypes
 * (pipeline/keytable.py). Keys come as two aligned u64 arrays; ``sel`` is a fingerprint's
 * ``hi``, ``val`` its ``lo``. Not thread-safe: the caller serialises calls on one table. */
#include <stdlib.h>

#define KT_MALLOC malloc
#define KT_CALLOC calloc
#define KT_FREE free
#include "keytable.h"

#define ALLOC_HEADER 8 /* glibc's header on each allocation */

/* A table placing keys by these salts (keytable.h): secret random ones from the caller. */
Table *kt_new(uint32_t bits, uint64_t salt_add, uint64_t salt_mul) {
    return table_new(bits, salt_add, salt_mul);
}

void kt_free(Table *t) { table_free(t); }

uint64_t kt_keys(const Table *t) { return t->keys; }

uint64_t kt_displacement(const Table *t) { return table_displacement(t); }

/* Bytes the table holds from the allocator: slots, segment headers, the table. */
uint64_t kt_bytes(const Table *t) {
    size_t n = (size_t)1 << t->bits;
    uint64_t bytes = sizeof(*t) + ALLOC_HEADER + n * sizeof(Segment) + ALLOC_HEADER;
    for (size_t i = 0; i < n; i++) {
        if (t->segs[i].slots) bytes += (uint64_t)t->segs[i].cap * 8 + ALLOC_HEADER;
    }
    return bytes;
}

/* Per key, 0 if in none of ``tables`` (added to tables[0] when ``add``), else 1 + the index
 * of the first holding it (255 for any past the 254th). Returns the keys added, or -1
 * (nothing done) when memory is short. */
int64_t kt_claim(Table **tables, int ntables, const uint64_t *hi, const uint64_t *lo, size_t n,
                 int add, unsigned char *out) {
    KeyView keys = {(const unsigned char *)hi, (const unsigned char *)lo, 8};
    size_t added = claim_keys(tables, ntables, keys, n, add, out, 0);
    return added == KT_NO_MEMORY ? -1 : (int64_t)added;
}

/* Keys held in segments [first, first + count). */
uint64_t kt_count(const Table *t, uint32_t first, uint32_t count) {
    uint64_t n = 0;
    for (uint32_t i = first; i < first + count; i++) n += t->segs[i].used;
    return n;
}

/* Writes the keys of segments [first, first + count) as (hi, lo): ``hi`` keeps only its top
 * bits (all a table looks at), ``lo`` is the value stored; unsalted, so any table reads them.
 * The arrays hold kt_count(t, first, count) keys. */
void kt_dump(const Table *t, uint32_t first, uint32_t count, uint64_t *hi, uint64_t *lo) {
    size_t k = 0;
    for (uint32_t i = first; i < first + count; i++) {
        const Segment *s = &t->segs[i];
        for (uint32_t j = 0; j < s->cap; j++) {
            if (!s->slots[j]) continue;
            hi[k] = segment_sel(t, i, s->slots[j]);
            lo[k++] = s->slots[j];
        }
    }
}

/* Per key of a batch: 1 if it is the first row holding its (hi, lo), else 0. A table of row
 * numbers (open addressing, at most half full) compares both halves, so the answer is exact.
 * A row's place is the top bits of lo * salt (``salt`` odd, secret, random): the fingerprint's
 * seeds are public, so event_ids crafted to share lo's top bits (2^19 tries each) would
 * otherwise pile into one probe run and make a group quadratic. Returns the probes past a
 * row's first slot (what such a pile-up would show), or -1 when n is too large or memory is
 * short. */
int64_t kt_first_copies(const uint64_t *hi, const uint64_t *lo, size_t n, uint64_t salt,
                    unsigned char *out) {
    if (n >= UINT32_MAX / 2) return -1;
    int bits = 4;
    while (((size_t)1 << bits) < 2 * n) bits++;
    size_t mask = ((size_t)1 << bits) - 1;
    uint32_t *rows = calloc(mask + 1, sizeof(uint32_t)); /* row + 1; 0 is empty */
    if (rows == NULL) return -1;
    int64_t probes = 0;
    for (size_t i = 0; i < n; i++) {
        if (i + AHEAD < n) __builtin_prefetch(&rows[(lo[i + AHEAD] * salt) >> (64 - bits)]);
        size_t at = (lo[i] * salt) >> (64 - bits);
        for (;;) {
            uint32_t row = rows[at];
            if (row == 0) {
                rows[at] = (uint32_t)(i + 1);
                out[i] = 1;
                break;
            }
            if (lo[row - 1] == lo[i] && hi[row - 1] == hi[i]) {
                out[i] = 0;
                break;
            }
            at = (at + 1) & mask;
            probes++;
        }
    }
    free(rows);
    return probes;
}
