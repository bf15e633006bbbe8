/*
 * CPU per 1 MiB WRITE payload received from an AF_UNIX stream socket and
 * stored in a RAM-backed (tmpfs) file, two ways, interleaved in one process:
 *
 *   copy:   recv() into a buffer (one copy), pwrite() at the offset (one copy)
 *   splice: splice() socket -> pipe (page references, no copy), splice()
 *           pipe -> file at the offset (one copy into the page cache)
 *
 * The question it answers (issue #16, session 25): would splicing NBD WRITE
 * payloads into a RAM-backed file cut bexd's CPU per 1 MiB write?  A child
 * process sends 1 MiB payloads as fast as it can (like fio's nbd engine);
 * the parent receives them non-blocking with poll(), as bexd's loop does,
 * and alternates the two ways every -b requests, so both see the same load.
 * CPU is the receiving thread's own (CLOCK_THREAD_CPUTIME_ID).  At the end
 * the file's last pass is checked against what was sent.
 *
 *   cc -O2 -Wall -o /tmp/swb bench/splice_write_bench.c
 *   /tmp/swb [-n requests] [-b block] [-p pipe-bytes] [-B] [-f /dev/shm/file]
 *
 * -B fills the pipe with the whole payload before writing it to the file
 * (one file write per request, as pwrite) instead of after every splice in.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define REQ (1u << 20)

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static double thread_cpu(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double wall(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* request i's payload: a fixed pattern, each 4 KiB page stamped with i and
 * the page's index (so a payload stored at the wrong offset, or a page lost
 * or duplicated, is seen); cheap enough that the sender stays fast */
static void fill(uint64_t *p, uint64_t i, bool whole)
{
    if (whole)
        for (size_t k = 0; k < REQ / 8; k++)
            p[k] = k * 0x9e3779b97f4a7c15ull;
    for (size_t pg = 0; pg < REQ / 4096; pg++)
        p[pg * 512] = (i << 32) | pg;
}

static void sender(int fd, long n)
{
    uint64_t *buf = malloc(REQ);
    if (!buf)
        die("malloc");
    for (long i = 0; i < n; i++) {
        fill(buf, i, i == 0);
        for (size_t o = 0; o < REQ;) {
            ssize_t k = send(fd, (char *)buf + o, REQ - o, 0);
            if (k <= 0)
                die("send");
            o += k;
        }
    }
    _exit(0);
}

struct stats {
    double cpu;
    long reqs, calls, polls;
};

static void wait_readable(int fd, struct stats *st)
{
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    if (poll(&pfd, 1, -1) < 0)
        die("poll");
    st->polls++;
}

static void recv_copy(int sock, int file, off_t off, char *buf, struct stats *st)
{
    size_t got = 0;
    while (got < REQ) {
        ssize_t k = recv(sock, buf + got, REQ - got, MSG_DONTWAIT);
        st->calls++;
        if (k < 0 && errno == EAGAIN) {
            wait_readable(sock, st);
            continue;
        }
        if (k <= 0)
            die("recv");
        got += k;
    }
    if (pwrite(file, buf, REQ, off) != (ssize_t)REQ)
        die("pwrite");
    st->calls++;
}

static void drain(int pipe_rd, int file, off_t off, size_t *got, size_t *inpipe,
                  struct stats *st)
{
    while (*inpipe) {
        loff_t o = off + *got;
        ssize_t k = splice(pipe_rd, NULL, file, &o, *inpipe, SPLICE_F_MOVE);
        st->calls++;
        if (k <= 0)
            die("splice pipe -> file");
        *inpipe -= k;
        *got += k;
    }
}

static void recv_splice(int sock, int file, off_t off, const int pipe[2], bool batch,
                        struct stats *st)
{
    size_t got = 0, inpipe = 0;
    while (got < REQ) {
        ssize_t k = splice(sock, NULL, pipe[1], NULL, REQ - got - inpipe,
                           SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        st->calls++;
        if (k < 0 && errno == EAGAIN) {
            if (inpipe)     /* the pipe is full, or the socket empty for now */
                drain(pipe[0], file, off, &got, &inpipe, st);
            else
                wait_readable(sock, st);
            continue;
        }
        if (k <= 0)
            die("splice socket -> pipe");
        inpipe += k;
        if (!batch || got + inpipe == REQ)
            drain(pipe[0], file, off, &got, &inpipe, st);
    }
}

int main(int argc, char **argv)
{
    const char *path = "/dev/shm/splice-write-bench.img";
    long n = 4000, block = 100;
    int pipe_size = REQ, opt;
    bool batch = false;
    const off_t fsize = 256 << 20;

    while ((opt = getopt(argc, argv, "n:b:p:Bf:")) != -1) {
        switch (opt) {
        case 'n': n = atol(optarg); break;
        case 'b': block = atol(optarg); break;
        case 'p': pipe_size = atoi(optarg); break;
        case 'B': batch = true; break;
        case 'f': path = optarg; break;
        default:
            fprintf(stderr, "usage: %s [-n requests] [-b block] [-p pipe-bytes] [-B] "
                    "[-f file]\n", argv[0]);
            return 2;
        }
    }
    if (n < 2 * block || block < 1) {
        fprintf(stderr, "need -n >= 2 * -b >= 2\n");
        return 2;
    }

    int sv[2], pp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
        die("socketpair");
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        close(sv[0]);
        sender(sv[1], n);
    }
    close(sv[1]);

    int file = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (file < 0 || ftruncate(file, fsize) < 0)
        die(path);
    if (fcntl(sv[0], F_SETFL, O_NONBLOCK) < 0 || pipe2(pp, O_NONBLOCK) < 0)
        die("set-up");
    if (fcntl(pp[1], F_SETPIPE_SZ, pipe_size) < 0)
        die("F_SETPIPE_SZ");
    char *buf = malloc(REQ);
    if (!buf)
        die("malloc");

    struct stats st[2] = { { 0 } };
    double t0 = wall();
    for (long i = 0; i < n; i++) {
        int way = (i / block) % 2;
        off_t off = (off_t)i * REQ % fsize;
        double c0 = thread_cpu();
        if (way == 0)
            recv_copy(sv[0], file, off, buf, &st[0]);
        else
            recv_splice(sv[0], file, off, pp, batch, &st[1]);
        st[way].cpu += thread_cpu() - c0;
        st[way].reqs++;
    }
    double secs = wall() - t0;
    int status;
    if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
        die("sender");

    /* the file's last pass must hold what was sent, whichever way it came */
    uint64_t *want = malloc(REQ);
    long first = n > fsize / REQ ? n - fsize / REQ : 0;
    for (long i = first; i < n; i++) {
        fill(want, i, i == first);
        if (pread(file, buf, REQ, (off_t)i * REQ % fsize) != (ssize_t)REQ ||
            memcmp(buf, want, REQ)) {
            fprintf(stderr, "request %ld: the file does not hold what was sent\n", i);
            return 1;
        }
    }
    unlink(path);

    printf("%ld requests of 1 MiB, %.0f MiB/s, pipe %d bytes%s, ways alternate every %ld\n",
           n, n / secs, pipe_size, batch ? " (whole payload per file write)" : "", block);
    for (int w = 0; w < 2; w++)
        printf("%-7s %7.1f us CPU/req  %5.2f syscalls/req  %5.2f polls/req\n",
               w ? "splice" : "copy", 1e6 * st[w].cpu / st[w].reqs,
               (double)st[w].calls / st[w].reqs, (double)st[w].polls / st[w].reqs);
    printf("splice/copy CPU per request: %.3f\n",
           (st[1].cpu / st[1].reqs) / (st[0].cpu / st[0].reqs));
    return 0;
}
