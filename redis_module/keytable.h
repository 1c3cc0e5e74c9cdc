/* keytable.h: a set of 128-bit event fingerprints, claimed in bulk. Shared by the Redis module
 * (adevents_keys.c, allocating with RedisModule_Alloc) and the embedded key cache
 * (pipeline/_keytable.c, loaded with ctypes; malloc), so both caches hold keys the same way.
 *
 * A table is 2^bits segments, each an open-addressing (linear probing) array of 8-byte slots.
 * A key is two u64 halves, ``sel`` and ``val``; ``val`` is stored (0 marks an empty slot, so a
 * ``val`` of 0 is stored as 1) and the top ``bits`` of ``sel`` are implicit in where: a table
 * tells keys apart by 64 + bits bits, not 64.
 *
 * Where a key goes is keyed by the table's two secret salts: h = val * salt_mul + salt_add
 * (mod 2^64, salt_mul odd: multiply-shift hashing, universal over the salts); the segment is
 * the top bits of sel ^ h, the home slot in it is given by h's next bits. The fingerprint's
 * seeds are public, so unkeyed, event_ids could be crafted offline (2^(bits + log2 cap) tries
 * each) to share a segment and a home slot and pile into one probe run, making every later
 * claim in that segment slow: a client-controlled slowdown of everyone's dedupe. Keyed, they
 * land as random keys do. Salts (0, 1) make h = val, i.e. unkeyed (tests measure the pile-up).
 * The placement is a bijection of (segment, val) with (top bits of sel, val), so a dump writes
 * keys as they came and any table, whatever its salts, reads them back.
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
#define AHEAD 8 /* keys: how far ahead memory is prefetched (half that with two tables
                   * or more to look in: see claim_keys) */

typedef struct {
    uint64_t *slots; /* NULL until the segment's first key */
    uint32_t used;
    uint32_t cap;
} Segment;

typedef struct {
    Segment *segs;
    uint64_t keys;
    uint64_t salt_add;
    uint64_t salt_mul; /* odd */
    uint32_t bits;
} Table;

static inline uint64_t load_u64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v; /* little-endian hosts (x86-64, arm64) */
}

static inline uint64_t stored_value(uint64_t v) { return v ? v : 1; }

/* The keyed hash of a stored value that places it (see the top of this file). */
static inline uint64_t placement(const Table *t, uint64_t v) {
    return v * t->salt_mul + t->salt_add;
}

/* The home slot of a value placed at h: h's bits below the segment's, scaled to the
 * capacity. */
static inline uint32_t home_of(const Table *t, uint64_t h, uint32_t cap) {
    return (uint32_t)(((unsigned __int128)(h << t->bits) * cap) >> 64);
}

static inline Segment *segment_of(const Table *t, uint64_t sel, uint64_t h) {
    return t->bits ? &t->segs[(sel ^ h) >> (64 - t->bits)] : &t->segs[0];
}

/* Segment index i in the top ``bits`` of a u64, the rest 0 (unkeyed, the segment such a
 * ``sel`` picks: how encoding 0 of the module's RDB placed keys). */
static inline uint64_t segment_top(const Table *t, size_t i) {
    return t->bits ? (uint64_t)i << (64 - t->bits) : 0;
}

/* The ``sel`` a dump writes for value v held in segment i: the top bits of the key's own
 * ``sel`` (all a table looks at), the rest 0; it places v in segment i again. */
static inline uint64_t segment_sel(const Table *t, size_t i, uint64_t v) {
    uint64_t top = segment_top(t, ((size_t)1 << t->bits) - 1); /* every segment bit set */
    return (segment_top(t, i) ^ placement(t, v)) & top;
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

/* A table with these salts (salt_mul is made odd): random ones from the includer, which
 * keeps them secret. */
static inline Table *table_new(uint32_t bits, uint64_t salt_add, uint64_t salt_mul) {
    Table *t = KT_MALLOC(sizeof(*t));
    t->bits = bits;
    t->keys = 0;
    t->salt_add = salt_add;
    t->salt_mul = salt_mul | 1;
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

/* Functions taking ``h`` take placement(t, v), which callers compute once a key. */
static inline int seg_find(const Table *t, const Segment *s, uint64_t v, uint64_t h) {
    if (!s->cap) return 0;
    uint32_t i = home_of(t, h, s->cap);
    for (;;) {
        uint64_t x = s->slots[i];
        if (x == v) return 1;
        if (x == 0) return 0;
        if (++i == s->cap) i = 0;
    }
}

static inline void seg_place(const Table *t, Segment *s, uint64_t v, uint64_t h) {
    uint32_t i = home_of(t, h, s->cap);
    while (s->slots[i]) {
        if (++i == s->cap) i = 0;
    }
    s->slots[i] = v;
    s->used++;
}

static inline void seg_resize(const Table *t, Segment *s, uint32_t cap) {
    Segment old = *s;
    s->slots = KT_CALLOC(cap, sizeof(uint64_t));
    s->cap = cap;
    s->used = 0;
    for (uint32_t i = 0; i < old.cap; i++) {
        uint64_t v = old.slots[i];
        if (v) seg_place(t, s, v, placement(t, v));
    }
    KT_FREE(old.slots);
}

/* Add v, known absent from s. */
static inline void seg_insert(const Table *t, Segment *s, uint64_t v, uint64_t h) {
    if ((uint64_t)(s->used + 1) * 4 > (uint64_t)s->cap * 3) {
        uint64_t want = 2 * (uint64_t)(s->used + 1);
        seg_resize(t, s, size_class_floor(want < MIN_CAP ? MIN_CAP : want));
    }
    seg_place(t, s, v, h);
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
 * misses in a big table. The header of key i + 2 * ahead and the home slot of key i + ahead
 * (whose header came in meanwhile) are requested while key i is probed. Each key's placement
 * in each table is computed once, with its header's prefetch, and kept in a ring of RING keys
 * a table (``hs``) until its probe. Forced inline: gcc -O2 left them as calls, which took a
 * claim from 55 to 150 ns a key (10M keys held). */
#define ALWAYS_INLINE __attribute__((always_inline)) inline
#define BIG_TABLE 65536 /* keys: a table whose slots (~0.7 MB) miss in the caches */
#define RING 32 /* keys a table; a power of two above 2 * AHEAD */
#define RING_STACK_TABLES 8 /* tables whose ring fits on the stack (2 KB); more: allocated */
#define KT_NO_MEMORY ((size_t)-1) /* claim_keys could not allocate its ring (nothing done) */
_Static_assert((RING & (RING - 1)) == 0 && RING > 2 * AHEAD, "RING: a power of two > 2 AHEAD");
#define RING_AT(hs, j, i) ((hs)[(size_t)(j) * RING + ((i) & (RING - 1))])

static ALWAYS_INLINE void prefetch_header(Table **tables, int ntables, KeyView keys, size_t i,
                                          uint64_t *hs) {
    uint64_t sel = key_sel(keys, i), v = key_val(keys, i);
    for (int j = 0; j < ntables; j++) {
        if (!tables[j]) continue;
        uint64_t h = RING_AT(hs, j, i) = placement(tables[j], v);
        __builtin_prefetch(segment_of(tables[j], sel, h));
    }
}

static ALWAYS_INLINE void prefetch_slot(Table **tables, int ntables, KeyView keys, size_t i,
                                        const uint64_t *hs) {
    uint64_t sel = key_sel(keys, i);
    for (int j = 0; j < ntables; j++) {
        if (!tables[j]) continue;
        uint64_t h = RING_AT(hs, j, i);
        Segment *s = segment_of(tables[j], sel, h);
        if (s->cap) __builtin_prefetch(&s->slots[home_of(tables[j], h, s->cap)]);
    }
}

/* Per key: 0 if in no table, else 1 + the index of the first table holding it, written as
 * ``base`` + that number. With ``add``, keys in none are added to tables[0] (a key repeated
 * in ``keys`` is new once, then held in tables[0]). A NULL table holds nothing; ``out`` may
 * be NULL. Returns the keys added, or KT_NO_MEMORY. */
static inline size_t claim_keys(Table **tables, int ntables, KeyView keys, size_t n, int add,
                                unsigned char *out, unsigned char base) {
    size_t added = 0;
    uint64_t stack[RING_STACK_TABLES * RING];
    uint64_t *hs = stack;
    if (ntables > RING_STACK_TABLES) {
        hs = KT_MALLOC((size_t)ntables * RING * sizeof(uint64_t));
        if (hs == NULL) return KT_NO_MEMORY;
    }
    /* Each table past the caches has a slot miss in flight per key ahead: with two or more
     * (a window's steady state: the previous generation is full too), a shorter distance
     * keeps them within what a core can have outstanding. Claims into a 5M-key table: with a
     * second one, 123-137 CPU ns a key at AHEAD / 2 against 150 at AHEAD; with a third,
     * 161-181 against 206-212; alone, 88 at AHEAD. */
    int big = 0;
    for (int j = 0; j < ntables; j++) big += tables[j] && tables[j]->keys >= BIG_TABLE;
    size_t ahead = big > 1 ? AHEAD / 2 : AHEAD;
    for (size_t i = 0; i < n && i < 2 * ahead; i++) prefetch_header(tables, ntables, keys, i, hs);
    for (size_t i = 0; i < n && i < ahead; i++) prefetch_slot(tables, ntables, keys, i, hs);
    for (size_t i = 0; i < n; i++) {
        if (i + 2 * ahead < n) prefetch_header(tables, ntables, keys, i + 2 * ahead, hs);
        if (i + ahead < n) prefetch_slot(tables, ntables, keys, i + ahead, hs);
        uint64_t sel = key_sel(keys, i), v = key_val(keys, i);
        int found = 0;
        for (int j = 0; j < ntables && !found; j++) {
            if (!tables[j]) continue;
            uint64_t h = RING_AT(hs, j, i);
            if (seg_find(tables[j], segment_of(tables[j], sel, h), v, h)) found = j + 1;
        }
        if (!found && add) {
            uint64_t h = RING_AT(hs, 0, i);
            seg_insert(tables[0], segment_of(tables[0], sel, h), v, h);
            tables[0]->keys++;
            added++;
        }
        /* An answer is a byte: past 255 - base tables, it says found, not where. */
        if (out) out[i] = (unsigned char)(base + (found > 255 - base ? 255 - base : found));
    }
    if (hs != stack) KT_FREE(hs);
    return added;
}

/* Add one key (sel, val as stored) unless held; whether it was added. */
static inline int table_add(Table *t, uint64_t sel, uint64_t v) {
    uint64_t h = placement(t, v);
    Segment *s = segment_of(t, sel, h);
    if (seg_find(t, s, v, h)) return 0;
    seg_insert(t, s, v, h);
    t->keys++;
    return 1;
}

/* Slots past their home slot, summed over the keys held: about keys / 2 for keys placed at
 * random at these loads, n^2 / 2 for n keys piled into one home. A diagnostic (a flooded
 * table shows here), not on any claim's path. */
static inline uint64_t table_displacement(const Table *t) {
    uint64_t total = 0;
    size_t n = (size_t)1 << t->bits;
    for (size_t i = 0; i < n; i++) {
        const Segment *s = &t->segs[i];
        for (uint32_t j = 0; j < s->cap; j++) {
            if (!s->slots[j]) continue;
            uint32_t home = home_of(t, placement(t, s->slots[j]), s->cap);
            total += j >= home ? j - home : j + s->cap - home;
        }
    }
    return total;
}

/* Slots allocated over all segments. */
static inline uint64_t table_slots(const Table *t) {
    uint64_t slots = 0;
    size_t n = (size_t)1 << t->bits;
    for (size_t i = 0; i < n; i++) slots += t->segs[i].cap;
    return slots;
}

#endif
