/* The FlushQueue batch kernel: one call validates a whole uniform batch of queued SetPTE
 * entries and, only if every entry passes, applies it (direct or shadow paging).
 *
 * Why C: on this machine kind the host TLB is cold after every exit from a guest at ring 3,
 * so each numpy call in the handler costs microseconds; one call here replaces about 25.
 *
 * The rules are not written here: the verdict table (PageTables._fast_tables, built from the
 * same rule function as the Python check) says, per level, frame facts and P/RW/PS bits,
 * whether an entry may be applied without further thought. Everything the kernel does not
 * accept (an invalid entry, a large leaf, a mixed or unknown call ID, a batch outside RAM)
 * is declined with nothing written, and the Python reference path decides and names the
 * first bad index. Every value read from the batch is a guest's: every index made from one
 * is bounds-checked before use, and nothing is written before every entry has passed.
 *
 * Counts, the A/D bits stored, shadow entries and stale ranges are exactly those of applying
 * the entries one by one in order (PageTables.apply, ShadowMmu.apply_pte), duplicates
 * included: no entry's verdict depends on another entry (docs/paging.md).
 */

#include <stdint.h>
#include <string.h>

#define VMK_ABI 2

#define P 1ull
#define RW 2ull
#define PS 0x80ull
#define A 0x20ull
#define D 0x40ull
#define CLASS_BITS (P | RW | PS)
#define ADDR_MASK 0x000FFFFFFFFFF000ull

enum { APPLIED_NONE = 0, DECLINED = -2, UNREADABLE = -1 };

struct vmk_region {        /* one guest-physical region the VMM has mapped */
    uint64_t gpa, end;
    uint64_t host;         /* its host address */
    uint64_t ram;          /* 1: guest RAM (a batch may be read from it, tables live in it) */
};

/* Every field is 8 bytes, so the Python side mirrors it as an array of u64 (vmk_ctx_words
 * says how many: the loader refuses a mismatch). */
struct vmk_ctx {
    uint64_t abi;
    const struct vmk_region *regions; uint64_t nregions;
    int64_t *scratch; uint64_t scratch_words;     /* the batch's copy (what is checked is applied) */
    int64_t **where; uint64_t where_cap;          /* per entry: its host slot, found while checking */
    uint64_t entry_words;                         /* words per batch entry (call ID word, args) */
    const uint64_t *keys; uint64_t nkeys;         /* queueable call IDs, annotation byte masked off */
    /* per 4 KiB frame, nfast entries each, the last one 0 (what an index beyond clips to) */
    const int64_t *fast_level; const int64_t *fast_facts; uint64_t nfast;
    const int8_t *verdicts; const int64_t *ad_bits; uint64_t nverdicts;
    int32_t *refs; uint64_t nrefs;
    int32_t *writable4; uint64_t nw4;
    int32_t *writable2; uint64_t nw2;
    int32_t *writable1; uint64_t nw1;
    uint64_t limit;                               /* counted frames lie below this */
    /* shadow paging (shadow == 0: direct) */
    int64_t *shadow; uint64_t shadow_words;       /* the shadow area */
    uint64_t shadow_base;
    const int64_t *shadow_slot;                   /* nfast: a table's shadow page, as a word index */
    const uint64_t *shadow_of; uint64_t nshadow_of;  /* by guest frame: its shadow page */
    const uint64_t *guest_of; uint64_t nguest_of;    /* by shadow page: the guest table */
    /* results */
    uint64_t *stale; uint64_t stale_cap;          /* (frame, size) pairs, stale_cap pairs */
    uint64_t nstale, everything, call_id;
};

uint64_t vmk_ctx_words(void) { return sizeof(struct vmk_ctx) / 8; }
uint64_t vmk_abi(void) { return VMK_ABI; }

static const struct vmk_region *find(const struct vmk_ctx *c, uint64_t gpa, uint64_t len)
{
    for (uint64_t k = 0; k < c->nregions; k++) {
        const struct vmk_region *r = &c->regions[k];
        if (r->ram && r->gpa <= gpa && gpa < r->end && len <= r->end - gpa)
            return r;
    }
    return 0;
}

/* GuestMemory.ram_words: the batch from RAM, across adjacent RAM regions. */
static int copy_in(struct vmk_ctx *c, uint64_t gpa, uint64_t words)
{
    uint64_t bytes = words * 8, done = 0;
    if (gpa & 7 || gpa > UINT64_MAX - bytes)
        return -1;
    while (done < bytes) {
        const struct vmk_region *r = find(c, gpa + done, 8);
        if (!r)
            return -1;
        uint64_t take = r->end - (gpa + done);
        if (take > bytes - done)
            take = bytes - done;
        memcpy((char *)c->scratch + done, (const char *)(uintptr_t)(r->host + (gpa + done - r->gpa)), take);
        done += take;
    }
    return 0;
}

static int queueable(const struct vmk_ctx *c, uint64_t word)
{
    uint64_t id = word & 0xFFFFFFFFull;
    if (word >> 32 || id & 0xFF00)  /* the reserved word, the reserved byte */
        return 0;
    for (uint64_t k = 0; k < c->nkeys; k++)
        if (c->keys[k] == (id & 0xFFFFFF00ull))
            return 1;
    return 0;
}

static int is_leaf(int64_t level, uint64_t v)
{
    return level == 1 || ((level == 2 || level == 3) && (v & PS));
}

/* PageTables._count: what a present entry counts towards (out-of-range frames: nothing). */
static void count(struct vmk_ctx *c, int64_t level, uint64_t v, int32_t delta)
{
    if (!(v & P))
        return;
    uint64_t frame = v & ADDR_MASK;
    if (frame >= c->limit)
        return;
    if (!is_leaf(level, v)) {
        if ((frame >> 12) < c->nrefs)
            c->refs[frame >> 12] += delta;
    } else if (v & RW) {
        if (level == 1 && (frame >> 12) < c->nw4)
            c->writable4[frame >> 12] += delta;
        else if (level == 2 && (frame >> 21) < c->nw2)
            c->writable2[frame >> 21] += delta;
        else if (level == 3 && (frame >> 30) < c->nw1)
            c->writable1[frame >> 30] += delta;
    }
}

static uint64_t clip(uint64_t i, uint64_t n) { return i < n ? i : n - 1; }

/* ShadowMmu._validated: the guest value last validated for an entry, from its shadow. */
static uint64_t from_shadow(const struct vmk_ctx *c, int64_t level, uint64_t s)
{
    if (!(s & P))
        return 0;
    if (is_leaf(level, s))
        return s;
    uint64_t page = ((s & ADDR_MASK) - c->shadow_base) >> 12;  /* wraps below the base: clipped */
    return (s & ~ADDR_MASK) | c->guest_of[clip(page, c->nguest_of)];
}

/* Returns the entries applied (count), or UNREADABLE / DECLINED with nothing written. */
int64_t vmk_flush(struct vmk_ctx *c, uint64_t gpa, uint64_t n)
{
    uint64_t ew = c->entry_words;
    c->nstale = c->everything = 0;
    if (c->abi != VMK_ABI || n == 0 || ew < 3 || n > c->where_cap || n > c->scratch_words / ew
        || n > c->stale_cap || c->nfast == 0)
        return DECLINED;
    if (copy_in(c, gpa, n * ew))
        return UNREADABLE;
    const int64_t *e = c->scratch;
    uint64_t first = (uint64_t)e[0];
    if (!queueable(c, first))
        return DECLINED;

    /* Check every entry; nothing is written in this loop. */
    for (uint64_t i = 0; i < n; i++) {
        const int64_t *row = e + i * ew;
        uint64_t ptep = (uint64_t)row[1], v = (uint64_t)row[2];
        if ((uint64_t)row[0] != first || ptep & 7 || ptep >> 52)
            return DECLINED;
        int64_t lv = c->fast_level[clip(ptep >> 12, c->nfast)];
        uint64_t index = (uint64_t)lv | (uint64_t)c->fast_facts[clip((v & ADDR_MASK) >> 12, c->nfast)]
                         | (v & CLASS_BITS);
        if (lv == 0 || index >= c->nverdicts || c->verdicts[index])
            return DECLINED;  /* not in a registered table, invalid, or for the general check */
        const struct vmk_region *r = find(c, ptep, 8);
        if (!r)
            return DECLINED;
        c->where[i] = (int64_t *)(uintptr_t)(r->host + (ptep - r->gpa));
        if (c->shadow) {
            uint64_t slot = (uint64_t)c->shadow_slot[clip(ptep >> 12, c->nfast)] + ((ptep >> 3) & 511);
            if (slot >= c->shadow_words)
                return DECLINED;
        }
    }

    /* Apply, in order: each entry sees what the entries before it left. */
    for (uint64_t i = 0; i < n; i++) {
        const int64_t *row = e + i * ew;
        uint64_t ptep = (uint64_t)row[1], v = (uint64_t)row[2];
        uint64_t frame = clip(ptep >> 12, c->nfast);  /* as checked above (never clipped here) */
        int64_t lv = c->fast_level[frame];
        int64_t level = lv >> 12;
        uint64_t index = (uint64_t)lv | (uint64_t)c->fast_facts[clip((v & ADDR_MASK) >> 12, c->nfast)]
                         | (v & CLASS_BITS);
        uint64_t stored = v | (uint64_t)c->ad_bits[index];
        uint64_t old;
        int64_t *shadow_entry = 0;
        if (c->shadow) {
            shadow_entry = &c->shadow[(uint64_t)c->shadow_slot[frame] + ((ptep >> 3) & 511)];
            old = from_shadow(c, level, (uint64_t)*shadow_entry);
        } else {
            old = (uint64_t)*c->where[i];
        }
        count(c, level, old, -1);
        count(c, level, stored, +1);
        *c->where[i] = (int64_t)stored;
        if (shadow_entry) {
            uint64_t s = 0;
            if (v & P)
                s = is_leaf(level, v) ? v | A | D
                    : (v & ~ADDR_MASK) | c->shadow_of[clip((v & ADDR_MASK) >> 12, c->nshadow_of)] | A;
            *shadow_entry = (int64_t)s;
        }
        if (old & P && old != stored) {  /* its cached translations went stale */
            if (!is_leaf(level, old)) {
                c->everything = 1;
            } else {
                uint64_t size = level == 1 ? 1ull << 12 : level == 2 ? 1ull << 21 : 1ull << 30;
                c->stale[2 * c->nstale] = old & ADDR_MASK & ~(size - 1);
                c->stale[2 * c->nstale + 1] = size;
                c->nstale++;
            }
        }
    }
    c->call_id = first;
    return (int64_t)n;
}
