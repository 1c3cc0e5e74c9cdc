/* keytable.h: a set of 128-bit event fingerprints, claimed in bulk. Shared by the Redis module
 * (adevents_keys.c, allocating with RedisModule_Alloc) and the embedded key cache
 * (pipeline/_keytable.c, loaded with ctypes; malloc), so both caches hold keys the same way.
 *
 * A table is 2^bits segments, each an open-addressing (linear probing) array of 8-byte slots.
 * A key is two u64 halves, ``sel`` and ``val``: the top ``bits`` of ``sel`` pick the segment,
 * ``val`` is stored in it (0 marks an empty slot, so a ``val`` of 0 is stored as 1). The
 * segment index is implicit in the slot's place, so a table tells keys apart by 64 + bits
 * bits, not 64.
 *
 * A segment grows (rehash of that segment alone: no latency spike) when an insert would take
 * its load above 3/4, to the largest allocator size class at or below twice its keys: its load
 * stays between 1/2 and 3/4, i.e. 10.7 to 16 bytes a key (plus 16 bytes a segment).
 * Capacities are of the form m * 2^k with m in 4..7: jemalloc size classes, so no allocation is
 * rounded up.
 *
 * The includer defines KT_MALLOC, KT_CALLOC and KT_FREE. */
#ifndef ADEVENTS_KEYTABLE_H
#define ADEVENTS_KEYTABLE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MIN_CAP 8
#define AHEAD 8 /* keys: how far ahead memory is prefetched */

typedef struct {
    uint64_t *slots; /* NULL until the segment's first key */
    uint32_t used;
    uint32_t cap;
} Segment;

typedef struct {
    Segment *segs;
    uint64_t keys;
    uint32_t bits;
} Table;

static inline uint64_t load_u64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v; /* little-endian hosts (x86-64, arm64) */
}

static inline uint64_t stored_value(uint64_t v) { return v ? v : 1; }

static inline uint32_t home_of(uint64_t v, uint32_t cap) {
    return (uint32_t)(((unsigned __int128)v * cap) >> 64);
}

static inline Segment *segment_of(Table *t, uint64_t sel) {
    return t->bits ? &t->segs[sel >> (64 - t->bits)] : &t->segs[0];
}

/* The smallest ``sel`` of segment i (its bits, the rest 0): what a dump keeps of a key's
 * ``sel``, which segment_of maps back to segment i. */
static inline uint64_t segment_sel(const Table *t, size_t i) {
    return t->bits ? (uint64_t)i << (64 - t->bits) : 0;
}

/* Largest m * 2^k (m in 4..7) at or below x (x >= 8). */
static inline uint32_t size_class_floor(uint64_t x) {
    int k = 63 - __builtin_clzll(x) - 2;
    return (uint32_t)((x >> k) << k);
}

/* Smallest m * 2^k (m in 4..7) at or above x (x >= 8). */
static inline uint32_t size_class_ceil(uint64_t x) {
    uint32_t f = size_class_floor(x);
    if (f >= x) return f;
    int k = 63 - __builtin_clzll(f) - 2;
    return f + ((uint32_t)1 << k); /* m + 1 (7 + 1 is 4 of the next power) */
}

static inline Table *table_new(uint32_t bits) {
    Table *t = KT_MALLOC(sizeof(*t));
    t->bits = bits;
    t->keys = 0;
    t->segs = KT_CALLOC((size_t)1 << bits, sizeof(Segment));
    return t;
}

static inline void table_free(void *value) {
    Table *t = value;
    size_t n = (size_t)1 << t->bits;
    for (size_t i = 0; i < n; i++) KT_FREE(t->segs[i].slots);
    KT_FREE(t->segs);
    KT_FREE(t);
}

static inline int seg_find(const Segment *s, uint64_t v) {
    if (!s->cap) return 0;
    uint32_t i = home_of(v, s->cap);
    for (;;) {
        uint64_t x = s->slots[i];
        if (x == v) return 1;
        if (x == 0) return 0;
        if (++i == s->cap) i = 0;
    }
}

static inline void seg_place(Segment *s, uint64_t v) {
    uint32_t i = home_of(v, s->cap);
    while (s->slots[i]) {
        if (++i == s->cap) i = 0;
    }
    s->slots[i] = v;
    s->used++;
}

static inline void seg_resize(Segment *s, uint32_t cap) {
    Segment old = *s;
    s->slots = KT_CALLOC(cap, sizeof(uint64_t));
    s->cap = cap;
    s->used = 0;
    for (uint32_t i = 0; i < old.cap; i++) {
        if (old.slots[i]) seg_place(s, old.slots[i]);
    }
    KT_FREE(old.slots);
}

/* Add v, known absent from s. */
static inline void seg_insert(Segment *s, uint64_t v) {
    if ((uint64_t)(s->used + 1) * 4 > (uint64_t)s->cap * 3) {
        uint64_t want = 2 * (uint64_t)(s->used + 1);
        seg_resize(s, size_class_floor(want < MIN_CAP ? MIN_CAP : want));
    }
    seg_place(s, v);
}

/* Keys are read at sel + i * stride and val + i * stride (bytes; any alignment): a blob of
 * 16-byte records (stride 16) or two aligned arrays (stride 8). */
typedef struct {
    const unsigned char *sel;
    const unsigned char *val;
    size_t stride;
} KeyView;

static inline uint64_t key_sel(KeyView k, size_t i) { return load_u64(k.sel + i * k.stride); }
static inline uint64_t key_val(KeyView k, size_t i) {
    return stored_value(load_u64(k.val + i * k.stride));
}

/* Memory prefetch: a key's probe touches its segment's header, then a slot, both usually cache
 * misses in a big table. The header of key i + 2 * AHEAD and the home slot of key i + AHEAD
 * (whose header came in meanwhile) are requested while key i is probed. Forced inline: gcc -O2
 * left them as calls, which took a claim from 55 to 150 ns a key (10M keys held). */
#define ALWAYS_INLINE __attribute__((always_inline)) inline
static ALWAYS_INLINE void prefetch_header(Table **tables, int ntables, KeyView keys, size_t i) {
    uint64_t sel = key_sel(keys, i);
    for (int j = 0; j < ntables; j++) {
        if (tables[j]) __builtin_prefetch(segment_of(tables[j], sel));
    }
}

static ALWAYS_INLINE void prefetch_slot(Table **tables, int ntables, KeyView keys, size_t i) {
    uint64_t sel = key_sel(keys, i), v = key_val(keys, i);
    for (int j = 0; j < ntables; j++) {
        if (!tables[j]) continue;
        Segment *s = segment_of(tables[j], sel);
        if (s->cap) __builtin_prefetch(&s->slots[home_of(v, s->cap)]);
    }
}

/* Per key: 0 if in no table, else 1 + the index of the first table holding it, written as
 * ``base`` + that number. With ``add``, keys in none are added to tables[0] (a key repeated
 * in ``keys`` is new once, then held in tables[0]). A NULL table holds nothing; ``out`` may
 * be NULL. Returns the keys added. */
static inline size_t claim_keys(Table **tables, int ntables, KeyView keys, size_t n, int add,
                         unsigned char *out, unsigned char base) {
    size_t added = 0;
    for (size_t i = 0; i < n && i < 2 * AHEAD; i++) prefetch_header(tables, ntables, keys, i);
    for (size_t i = 0; i < n && i < AHEAD; i++) prefetch_slot(tables, ntables, keys, i);
    for (size_t i = 0; i < n; i++) {
        if (i + 2 * AHEAD < n) prefetch_header(tables, ntables, keys, i + 2 * AHEAD);
        if (i + AHEAD < n) prefetch_slot(tables, ntables, keys, i + AHEAD);
        uint64_t sel = key_sel(keys, i), v = key_val(keys, i);
        int found = 0;
        for (int j = 0; j < ntables && !found; j++) {
            if (tables[j] && seg_find(segment_of(tables[j], sel), v)) found = j + 1;
        }
        if (!found && add) {
            seg_insert(segment_of(tables[0], sel), v);
            tables[0]->keys++;
            added++;
        }
        if (out) out[i] = (unsigned char)(base + found);
    }
    return added;
}

/* Slots allocated over all segments. */
static inline uint64_t table_slots(const Table *t) {
    uint64_t slots = 0;
    size_t n = (size_t)1 << t->bits;
    for (size_t i = 0; i < n; i++) slots += t->segs[i].cap;
    return slots;
}

#endif
