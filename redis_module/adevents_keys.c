/* adevents_keys: a Redis module type holding a set of 128-bit event fingerprints, claimed in
 * bulk (one blob of keys per command, one byte of answer per key).
 *
 * The table itself (segments of open addressing, 10.7 to 16 bytes a key) is keytable.h, which
 * the embedded key cache shares. A key is a 16-byte record here (little-endian u64 ``sel``,
 * u64 ``val``).
 *
 * Commands (keys last, so a Cluster routes them and scripts declare them):
 *   ADEVENTS.CLAIM bits blob own [other ...]  per key: '0' new (added to own), else '1' + the
 *                                             index of the first table holding it (own = 0).
 *                                             A key repeated in one blob is new once, then
 *                                             held in own ('1').
 *   ADEVENTS.ADD bits blob key                add; replies the number of keys added.
 *   ADEVENTS.PROBE blob key [key ...]         per key: '0' absent, else '1' + table index.
 *   ADEVENTS.INFO key                         [bits, keys, slots, bytes] or nil.
 *   ADEVENTS.DISPLACEMENT key                 slots past home summed over the keys (a scan of
 *                                             the table: a diagnostic, see keytable.h).
 * ``bits`` is the segment bits of a table created by the call; an existing table must have
 * them (ADEVENTS_BITS error otherwise). Each table gets its own secret salts from Redis's
 * random source when created (keytable.h: crafted ids cannot pile up). Writes are replicated
 * verbatim: answers do not depend on the salts, so a replica's tables may have their own.
 * Persistence: RDB (rdb_save/rdb_load, salts included; encoding 0, from before salts, loads
 * into a salted table) and AOF rewrite (ADEVENTS.ADD of the keys as they came). */

#include "redismodule.h"

#define KT_MALLOC RedisModule_Alloc
#define KT_CALLOC RedisModule_Calloc
#define KT_FREE RedisModule_Free
#include "keytable.h"

#include <stdint.h>
#include <string.h>

#define TYPE_NAME "adev-keys" /* exactly 9 characters */
#define ENCVER 1 /* 1: salts after bits; 0: no salts (placed unkeyed) */
#define MAX_BITS 20
#define REC 16
#define MAX_TABLES 64 /* answers stay printable: '1' + 63 = 'p' */
#define AOF_CHUNK 65536

static RedisModuleType *TableType;

static Table *new_table(uint32_t bits) {
    uint64_t salt[2];
    RedisModule_GetRandomBytes((unsigned char *)salt, sizeof(salt));
    return table_new(bits, salt[0], salt[1]);
}

static size_t table_bytes(const Table *t) {
    size_t n = (size_t)1 << t->bits;
    size_t bytes = RedisModule_MallocSize((void *)t) + RedisModule_MallocSize(t->segs);
    for (size_t i = 0; i < n; i++) {
        if (t->segs[i].slots) bytes += RedisModule_MallocSize(t->segs[i].slots);
    }
    return bytes;
}

/* -- type methods ------------------------------------------------------------------------- */
/* Encoding 0's segment i, whose keys were placed unkeyed: each key goes where this table's
 * salts put it. */
static void load_unkeyed_segment(Table *t, size_t i, const char *buf, uint64_t used) {
    uint64_t sel = segment_top(t, i);
    for (uint64_t j = 0; j < used; j++) {
        table_add(t, sel, stored_value(load_u64((const unsigned char *)buf + 8 * j)));
    }
}

static void *table_rdb_load(RedisModuleIO *rdb, int encver) {
    if (encver != ENCVER && encver != 0) return NULL;
    uint64_t bits = RedisModule_LoadUnsigned(rdb);
    if (RedisModule_IsIOError(rdb) || bits > MAX_BITS) return NULL;
    Table *t;
    if (encver == 0) {
        t = new_table((uint32_t)bits);
    } else {
        uint64_t salt_add = RedisModule_LoadUnsigned(rdb);
        uint64_t salt_mul = RedisModule_LoadUnsigned(rdb);
        if (RedisModule_IsIOError(rdb)) return NULL;
        t = table_new((uint32_t)bits, salt_add, salt_mul);
    }
    size_t n = (size_t)1 << bits;
    for (size_t i = 0; i < n; i++) {
        uint64_t used = RedisModule_LoadUnsigned(rdb);
        if (RedisModule_IsIOError(rdb)) goto fail;
        if (!used) continue;
        size_t len;
        char *buf = RedisModule_LoadStringBuffer(rdb, &len);
        if (RedisModule_IsIOError(rdb) || buf == NULL) goto fail;
        if (len != used * 8 || used > UINT32_MAX / 2) {
            RedisModule_Free(buf);
            goto fail;
        }
        if (encver == 0) {
            load_unkeyed_segment(t, i, buf, used);
            RedisModule_Free(buf);
            continue;
        }
        /* The smallest capacity holding them at a load of at most 3/4 (so at least 3/5). */
        Segment *s = &t->segs[i];
        uint64_t want = (4 * used + 2) / 3;
        seg_resize(t, s, size_class_ceil(want < MIN_CAP ? MIN_CAP : want));
        for (uint64_t j = 0; j < used; j++) {
            uint64_t v = stored_value(load_u64((unsigned char *)buf + 8 * j));
            uint64_t h = placement(t, v);
            if (!seg_find(t, s, v, h)) {
                seg_place(t, s, v, h);
                t->keys++;
            }
        }
        RedisModule_Free(buf);
    }
    return t;
fail:
    table_free(t);
    return NULL;
}

static void table_rdb_save(RedisModuleIO *rdb, void *value) {
    Table *t = value;
    RedisModule_SaveUnsigned(rdb, t->bits);
    RedisModule_SaveUnsigned(rdb, t->salt_add);
    RedisModule_SaveUnsigned(rdb, t->salt_mul);
    size_t n = (size_t)1 << t->bits;
    uint64_t *buf = NULL;
    uint32_t bufcap = 0;
    for (size_t i = 0; i < n; i++) {
        Segment *s = &t->segs[i];
        RedisModule_SaveUnsigned(rdb, s->used);
        if (!s->used) continue;
        if (s->used > bufcap) {
            bufcap = s->used;
            buf = RedisModule_Realloc(buf, (size_t)bufcap * 8);
        }
        uint32_t k = 0;
        for (uint32_t j = 0; j < s->cap; j++) {
            if (s->slots[j]) buf[k++] = s->slots[j];
        }
        RedisModule_SaveStringBuffer(rdb, (const char *)buf, (size_t)k * 8);
    }
    RedisModule_Free(buf);
}

static void table_aof_rewrite(RedisModuleIO *aof, RedisModuleString *key, void *value) {
    Table *t = value;
    size_t n = (size_t)1 << t->bits;
    unsigned char *buf = RedisModule_Alloc((size_t)AOF_CHUNK * REC);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        Segment *s = &t->segs[i];
        for (uint32_t j = 0; j < s->cap; j++) {
            if (!s->slots[j]) continue;
            uint64_t sel = segment_sel(t, i, s->slots[j]);
            memcpy(buf + k * REC, &sel, 8);
            memcpy(buf + k * REC + 8, &s->slots[j], 8);
            if (++k == AOF_CHUNK) {
                RedisModule_EmitAOF(aof, "ADEVENTS.ADD", "lbs", (long long)t->bits,
                                    (const char *)buf, k * REC, key);
                k = 0;
            }
        }
    }
    if (k || !t->keys) {
        RedisModule_EmitAOF(aof, "ADEVENTS.ADD", "lbs", (long long)t->bits, (const char *)buf,
                            k * REC, key);
    }
    RedisModule_Free(buf);
}

static size_t table_mem_usage(const void *value) { return table_bytes(value); }

static size_t table_free_effort(RedisModuleString *key, const void *value) {
    (void)key;
    const Table *t = value;
    return ((size_t)1 << t->bits) + 1; /* one allocation per segment: big tables free lazily */
}

/* -- commands ----------------------------------------------------------------------------- */

/* Open ``name``; *out is its table, or NULL when the key does not exist. */
static int open_table(RedisModuleCtx *ctx, RedisModuleString *name, int mode, Table **out) {
    RedisModuleKey *key = RedisModule_OpenKey(ctx, name, mode);
    int type = RedisModule_KeyType(key);
    if (type == REDISMODULE_KEYTYPE_EMPTY) {
        *out = NULL;
        return REDISMODULE_OK;
    }
    if (RedisModule_ModuleTypeGetType(key) != TableType) {
        RedisModule_ReplyWithError(ctx, REDISMODULE_ERRORMSG_WRONGTYPE);
        return REDISMODULE_ERR;
    }
    *out = RedisModule_ModuleTypeGetValue(key);
    return REDISMODULE_OK;
}

/* The table to write to under ``name``, created with ``bits`` segment bits if absent. */
static int open_own(RedisModuleCtx *ctx, RedisModuleString *name, uint32_t bits, Table **out) {
    RedisModuleKey *key = RedisModule_OpenKey(ctx, name, REDISMODULE_READ | REDISMODULE_WRITE);
    int type = RedisModule_KeyType(key);
    if (type == REDISMODULE_KEYTYPE_EMPTY) {
        *out = new_table(bits);
        RedisModule_ModuleTypeSetValue(key, TableType, *out);
        return REDISMODULE_OK;
    }
    if (RedisModule_ModuleTypeGetType(key) != TableType) {
        RedisModule_ReplyWithError(ctx, REDISMODULE_ERRORMSG_WRONGTYPE);
        return REDISMODULE_ERR;
    }
    *out = RedisModule_ModuleTypeGetValue(key);
    if ((*out)->bits != bits) {
        RedisModule_ReplyWithError(ctx, "ADEVENTS_BITS the table has other segment bits");
        return REDISMODULE_ERR;
    }
    return REDISMODULE_OK;
}

static int parse_bits(RedisModuleCtx *ctx, RedisModuleString *arg, uint32_t *bits) {
    long long v;
    if (RedisModule_StringToLongLong(arg, &v) != REDISMODULE_OK || v < 0 || v > MAX_BITS) {
        RedisModule_ReplyWithError(ctx, "ERR bits must be an integer from 0 to 20");
        return REDISMODULE_ERR;
    }
    *bits = (uint32_t)v;
    return REDISMODULE_OK;
}

static int parse_blob(RedisModuleCtx *ctx, RedisModuleString *arg, const unsigned char **p,
                      size_t *n) {
    size_t len;
    *p = (const unsigned char *)RedisModule_StringPtrLen(arg, &len);
    if (len % REC) {
        RedisModule_ReplyWithError(ctx, "ERR blob length must be a multiple of 16 bytes");
        return REDISMODULE_ERR;
    }
    *n = len / REC;
    return REDISMODULE_OK;
}

static inline KeyView blob_keys(const unsigned char *blob) {
    return (KeyView){blob, blob + 8, REC};
}

static int reply_mask(RedisModuleCtx *ctx, Table **tables, int ntables, const unsigned char *blob,
                      size_t n, int add) {
    unsigned char *out = RedisModule_Alloc(n ? n : 1);
    claim_keys(tables, ntables, blob_keys(blob), n, add, out, '0');
    RedisModule_ReplyWithStringBuffer(ctx, (const char *)out, n);
    RedisModule_Free(out);
    return REDISMODULE_OK;
}

/* ADEVENTS.CLAIM bits blob own [other ...] */
static int cmd_claim(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    RedisModule_AutoMemory(ctx); /* closes the keys opened (and signals them modified) */
    if (argc < 4) return RedisModule_WrongArity(ctx);
    int ntables = argc - 3;
    if (ntables > MAX_TABLES) return RedisModule_ReplyWithError(ctx, "ERR too many tables");
    uint32_t bits;
    const unsigned char *blob;
    size_t n;
    if (parse_bits(ctx, argv[1], &bits) != REDISMODULE_OK) return REDISMODULE_OK;
    if (parse_blob(ctx, argv[2], &blob, &n) != REDISMODULE_OK) return REDISMODULE_OK;
    Table *tables[MAX_TABLES];
    for (int j = 1; j < ntables; j++) {
        if (open_table(ctx, argv[3 + j], REDISMODULE_READ, &tables[j]) != REDISMODULE_OK) {
            return REDISMODULE_OK;
        }
    }
    if (open_own(ctx, argv[3], bits, &tables[0]) != REDISMODULE_OK) return REDISMODULE_OK;
    reply_mask(ctx, tables, ntables, blob, n, 1);
    RedisModule_ReplicateVerbatim(ctx);
    return REDISMODULE_OK;
}

/* ADEVENTS.ADD bits blob key */
static int cmd_add(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    RedisModule_AutoMemory(ctx); /* closes the keys opened (and signals them modified) */
    if (argc != 4) return RedisModule_WrongArity(ctx);
    uint32_t bits;
    const unsigned char *blob;
    size_t n;
    Table *own;
    if (parse_bits(ctx, argv[1], &bits) != REDISMODULE_OK) return REDISMODULE_OK;
    if (parse_blob(ctx, argv[2], &blob, &n) != REDISMODULE_OK) return REDISMODULE_OK;
    if (open_own(ctx, argv[3], bits, &own) != REDISMODULE_OK) return REDISMODULE_OK;
    size_t added = claim_keys(&own, 1, blob_keys(blob), n, 1, NULL, 0);
    RedisModule_ReplyWithLongLong(ctx, (long long)added);
    RedisModule_ReplicateVerbatim(ctx);
    return REDISMODULE_OK;
}

/* ADEVENTS.PROBE blob key [key ...] */
static int cmd_probe(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    RedisModule_AutoMemory(ctx); /* closes the keys opened (and signals them modified) */
    if (argc < 3) return RedisModule_WrongArity(ctx);
    int ntables = argc - 2;
    if (ntables > MAX_TABLES) return RedisModule_ReplyWithError(ctx, "ERR too many tables");
    const unsigned char *blob;
    size_t n;
    if (parse_blob(ctx, argv[1], &blob, &n) != REDISMODULE_OK) return REDISMODULE_OK;
    Table *tables[MAX_TABLES];
    for (int j = 0; j < ntables; j++) {
        if (open_table(ctx, argv[2 + j], REDISMODULE_READ, &tables[j]) != REDISMODULE_OK) {
            return REDISMODULE_OK;
        }
    }
    return reply_mask(ctx, tables, ntables, blob, n, 0);
}

/* ADEVENTS.INFO key */
static int cmd_info(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    RedisModule_AutoMemory(ctx); /* closes the keys opened (and signals them modified) */
    if (argc != 2) return RedisModule_WrongArity(ctx);
    Table *t;
    if (open_table(ctx, argv[1], REDISMODULE_READ, &t) != REDISMODULE_OK) return REDISMODULE_OK;
    if (!t) return RedisModule_ReplyWithNull(ctx);
    uint64_t slots = table_slots(t);
    RedisModule_ReplyWithArray(ctx, 4);
    RedisModule_ReplyWithLongLong(ctx, t->bits);
    RedisModule_ReplyWithLongLong(ctx, (long long)t->keys);
    RedisModule_ReplyWithLongLong(ctx, (long long)slots);
    RedisModule_ReplyWithLongLong(ctx, (long long)table_bytes(t));
    return REDISMODULE_OK;
}

/* ADEVENTS.DISPLACEMENT key */
static int cmd_displacement(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    RedisModule_AutoMemory(ctx); /* closes the keys opened (and signals them modified) */
    if (argc != 2) return RedisModule_WrongArity(ctx);
    Table *t;
    if (open_table(ctx, argv[1], REDISMODULE_READ, &t) != REDISMODULE_OK) return REDISMODULE_OK;
    if (!t) return RedisModule_ReplyWithNull(ctx);
    return RedisModule_ReplyWithLongLong(ctx, (long long)table_displacement(t));
}

int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    if (RedisModule_Init(ctx, "adevents", 1, REDISMODULE_APIVER_1) == REDISMODULE_ERR) {
        return REDISMODULE_ERR;
    }
    RedisModuleTypeMethods tm = {
        .version = REDISMODULE_TYPE_METHOD_VERSION,
        .rdb_load = table_rdb_load,
        .rdb_save = table_rdb_save,
        .aof_rewrite = table_aof_rewrite,
        .mem_usage = table_mem_usage,
        .free = table_free,
        .free_effort = table_free_effort,
    };
    TableType = RedisModule_CreateDataType(ctx, TYPE_NAME, ENCVER, &tm);
    if (TableType == NULL) return REDISMODULE_ERR;
    /* Key specs: the table written (RW insert) and those only read (RO access), so ACLs,
     * Cluster routing and scripts see which is which. */
#define SPEC(first, last, spec_flags)                                                         \
    {                                                                                         \
        .flags = (spec_flags), .begin_search_type = REDISMODULE_KSPEC_BS_INDEX,              \
        .bs.index.pos = (first), .find_keys_type = REDISMODULE_KSPEC_FK_RANGE,               \
        .fk.range = {(last), 1, 0}                                                            \
    }
    const uint64_t written = REDISMODULE_CMD_KEY_RW | REDISMODULE_CMD_KEY_INSERT;
    const uint64_t read = REDISMODULE_CMD_KEY_RO | REDISMODULE_CMD_KEY_ACCESS;
    RedisModuleCommandKeySpec claim_keys[] = {SPEC(3, 0, written), SPEC(4, -1, read), {0}};
    RedisModuleCommandKeySpec add_keys[] = {SPEC(3, 0, written), {0}};
    RedisModuleCommandKeySpec probe_keys[] = {SPEC(2, -1, read), {0}};
    RedisModuleCommandKeySpec info_keys[] = {SPEC(1, 0, REDISMODULE_CMD_KEY_RO), {0}};
#undef SPEC
    struct {
        const char *name;
        RedisModuleCmdFunc fn;
        const char *flags;
        int first, last, step, arity;
        RedisModuleCommandKeySpec *specs;
    } cmds[] = {
        {"adevents.claim", cmd_claim, "write deny-oom", 3, -1, 1, -4, claim_keys},
        {"adevents.add", cmd_add, "write deny-oom", 3, 3, 1, 4, add_keys},
        {"adevents.probe", cmd_probe, "readonly", 2, -1, 1, -3, probe_keys},
        {"adevents.info", cmd_info, "readonly fast", 1, 1, 1, 2, info_keys},
        {"adevents.displacement", cmd_displacement, "readonly", 1, 1, 1, 2, info_keys},
    };
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        if (RedisModule_CreateCommand(ctx, cmds[i].name, cmds[i].fn, cmds[i].flags, cmds[i].first,
                                      cmds[i].last, cmds[i].step) == REDISMODULE_ERR) {
            return REDISMODULE_ERR;
        }
        if (RedisModule_SetCommandInfo == NULL) continue; /* Redis < 7: the range above */
        RedisModuleCommandInfo info = {
            .version = REDISMODULE_COMMAND_INFO_VERSION,
            .arity = cmds[i].arity,
            .key_specs = cmds[i].specs,
        };
        RedisModuleCommand *cmd = RedisModule_GetCommand(ctx, cmds[i].name);
        if (RedisModule_SetCommandInfo(cmd, &info) == REDISMODULE_ERR) return REDISMODULE_ERR;
    }
    return REDISMODULE_OK;
}
