/*
 * diskchk: a disk workload that proves its disk and its memory agree, for live-migration
 * tests that move both.
 *
 * usage: diskchk DEV SPAN_MiB BLOCK_KiB [RATE]
 *   DEV      : block device (opened O_DIRECT)
 *   SPAN_MiB : the first SPAN MiB of DEV are written and checked
 *   BLOCK_KiB: block size (a multiple of 4)
 *   RATE     : blocks written per second (0/absent = as fast as possible)
 *
 * Each iteration writes one pseudo-random block with a new generation and reads back one
 * block in a rolling sweep. A block carries a header (magic, its index, its generation) and a
 * payload derived from both; the generation each block should hold lives in this process's
 * memory. After a migration that moves memory and disk separately, every block read must hold
 * exactly the generation memory says: a disk behind or ahead of memory, a lost write, a chunk
 * from the wrong place or a corrupted one all show as BAD.
 *
 * Output (stdout, a line each):
 *   DISKCHK ready blocks=<n> block_kib=<k>
 *   DISKCHK t=<s> writes=<n> wmib_s=<x> checked=<n> bad=<n> maxgap_ms=<n>   (every second)
 *   DISKCHK sweep=<n> checked=<n> bad=<n> t=<s>                            (a full sweep)
 *   DISKCHK BAD block=<i> want=<g> got_block=<i> got_gen=<g> payload_ok=<0|1>
 *   DISKCHK ERROR <what> block=<i> errno=<e>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x31304b4843444d4cULL /* "LMDCHK01" */

struct header {
    uint64_t magic;
    uint32_t block;
    uint32_t gen;
    uint64_t run; /* this run's id: a block from an earlier run never passes */
};

static uint64_t run_id;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static uint64_t mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static void fill(uint64_t *w, size_t words, uint32_t block, uint32_t gen)
{
    struct header *h = (struct header *)w;
    h->magic = MAGIC;
    h->block = block;
    h->gen = gen;
    h->run = run_id;
    uint64_t s = mix((((uint64_t)block << 32) | gen) ^ run_id);
    for (size_t i = 3; i < words; i++)
        w[i] = s = mix(s + i);
}

/* The payload matches the header's own block and generation. */
static int payload_ok(const uint64_t *w, size_t words)
{
    const struct header *h = (const struct header *)w;
    if (h->run != run_id)
        return 0;
    uint64_t s = mix((((uint64_t)h->block << 32) | h->gen) ^ run_id);
    for (size_t i = 3; i < words; i++) {
        s = mix(s + i);
        if (w[i] != s)
            return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s DEV SPAN_MiB BLOCK_KiB [RATE]\n", argv[0]);
        return 2;
    }
    const char *dev = argv[1];
    uint64_t span = strtoull(argv[2], 0, 0) << 20;
    size_t bs = strtoul(argv[3], 0, 0) << 10;
    uint64_t rate = argc > 4 ? strtoull(argv[4], 0, 0) : 0;
    if (bs < 4096 || bs % 4096 || span < bs) {
        fprintf(stderr, "diskchk: bad sizes\n");
        return 2;
    }
    uint32_t n = (uint32_t)(span / bs);
    size_t words = bs / 8;
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) {
        printf("DISKCHK ERROR open errno=%d\n", errno);
        return 1;
    }
    uint32_t *done = calloc(n, sizeof *done); /* generation on disk */
    /* pend: the newest generation of writes that failed (any of done+1..pend may be there,
     * or, for a block never written, what the disk held before) */
    uint32_t *pend = calloc(n, sizeof *pend);
    uint64_t *wbuf, *rbuf;
    if (!done || !pend || posix_memalign((void **)&wbuf, 4096, bs) || posix_memalign((void **)&rbuf, 4096, bs)) {
        printf("DISKCHK ERROR alloc\n");
        return 1;
    }
    printf("DISKCHK ready blocks=%u block_kib=%zu\n", n, bs >> 10);
    fflush(stdout);

    run_id = mix(now_ns() ^ ((uint64_t)getpid() << 32)) | 1;
    uint64_t rng = mix(now_ns() + 1), t0 = now_ns(), last_print = t0, last_t = t0, maxgap = 0;
    uint64_t writes = 0, attempts = 0, writes_at_print = 0, checked = 0, bad = 0;
    uint64_t sweep = 0, sweep_checked = 0, sweep_bad = 0;
    uint32_t pos = 0;
    for (;;) {
        /* write one block */
        rng = mix(rng + 1);
        uint32_t b = (uint32_t)(rng % n);
        uint32_t g = done[b] + 1;
        if (pend[b] >= g)
            g = pend[b] + 1;
        fill(wbuf, words, b, g);
        pend[b] = g;
        attempts++;
        if (pwrite(fd, wbuf, bs, (off_t)b * bs) == (ssize_t)bs) {
            done[b] = g;
            pend[b] = 0;
            writes++;
        } else {
            printf("DISKCHK ERROR write block=%u errno=%d\n", b, errno);
        }

        /* read back one block of the sweep */
        uint32_t v = pos;
        if (done[v] || pend[v]) {
            if (pread(fd, rbuf, bs, (off_t)v * bs) != (ssize_t)bs) {
                printf("DISKCHK ERROR read block=%u errno=%d\n", v, errno);
                bad++;
                sweep_bad++;
            } else {
                const struct header *h = (const struct header *)rbuf;
                int ok_payload = h->magic == MAGIC && payload_ok(rbuf, words);
                /* after failed writes, any of their generations may be on disk, or, for a
                 * block never written, its earlier content */
                int gen_ok = h->gen == done[v] || (pend[v] && h->gen > done[v] && h->gen <= pend[v]);
                int untouched = pend[v] && !done[v] && !ok_payload;
                if (untouched) {
                    /* the failed first write did not land: nothing to check yet */
                } else if (h->magic != MAGIC || h->block != v || !gen_ok || !ok_payload) {
                    printf("DISKCHK BAD block=%u want=%u got_block=%u got_gen=%u payload_ok=%d\n", v, done[v],
                           h->magic == MAGIC ? h->block : 0xffffffffu, h->magic == MAGIC ? h->gen : 0, ok_payload);
                    bad++;
                    sweep_bad++;
                } else if (pend[v] && h->gen > done[v]) {
                    done[v] = h->gen;
                    if (done[v] == pend[v])
                        pend[v] = 0;
                }
            }
            checked++;
            sweep_checked++;
        }
        if (++pos == n) {
            pos = 0;
            sweep++;
            printf("DISKCHK sweep=%llu checked=%llu bad=%llu t=%.1f\n", (unsigned long long)sweep,
                   (unsigned long long)sweep_checked, (unsigned long long)sweep_bad, (now_ns() - t0) / 1e9);
            sweep_checked = sweep_bad = 0;
        }

        uint64_t t = now_ns();
        if (t - last_t > maxgap)
            maxgap = t - last_t;
        if (t - last_print >= 1000000000ULL) {
            double secs = (t - last_print) / 1e9;
            printf("DISKCHK t=%.1f writes=%llu wmib_s=%.1f checked=%llu bad=%llu maxgap_ms=%llu\n", (t - t0) / 1e9,
                   (unsigned long long)writes, (writes - writes_at_print) * (double)bs / (1 << 20) / secs,
                   (unsigned long long)checked, (unsigned long long)bad, (unsigned long long)(maxgap / 1000000));
            fflush(stdout);
            last_print = t;
            writes_at_print = writes;
            maxgap = 0;
        }
        if (rate) {
            uint64_t due = t0 + attempts * 1000000000ULL / rate;
            uint64_t now = now_ns();
            if (due > now) {
                struct timespec ts = {(time_t)((due - now) / 1000000000ULL), (long)((due - now) % 1000000000ULL)};
                nanosleep(&ts, 0);
            }
        }
        last_t = now_ns();
    }
}
