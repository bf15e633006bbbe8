/*
 * The floor under every qd1 row: what one round trip between two
 * processes costs on this machine, with no server work at all.
 *
 * A parent sends a 28-byte request over an AF_UNIX stream socket (the
 * size of an NBD request header) and waits for a 16-byte reply (a simple
 * reply), which a child sends back at once.  Both sides sleep in recv as
 * a client and a server do between requests.  Whatever a server does, a
 * qd1 row served through another process costs at least the device's
 * latency plus this round trip, so with the limit row's IOPS (-l) it
 * prints the highest share of that row any such server can reach.
 *
 *   cc -O2 -Wall -o /tmp/hop-floor bench/hop_floor.c
 *   /tmp/hop-floor [-n ROUNDS] [-l LIMIT_IOPS] [-c same|split]
 *
 * -c pins the two processes to one CPU (same) or to CPUs 0 and 1 (split);
 * by default the scheduler places them.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define REQ_BYTES 28
#define REP_BYTES 16

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        perror("sched_setaffinity");
}

static int exchange(int fd, const char *out, size_t n_out, char *in, size_t n_in)
{
    if (n_out && send(fd, out, n_out, 0) != (ssize_t)n_out)
        return -1;
    return recv(fd, in, n_in, MSG_WAITALL) == (ssize_t)n_in ? 0 : -1;
}

int main(int argc, char **argv)
{
    int rounds = 100000, opt;
    double limit_iops = 0;
    const char *cpus = NULL;

    while ((opt = getopt(argc, argv, "n:l:c:")) != -1) {
        switch (opt) {
        case 'n': rounds = atoi(optarg); break;
        case 'l': limit_iops = atof(optarg); break;
        case 'c': cpus = optarg; break;
        default:
            fprintf(stderr, "usage: %s [-n ROUNDS] [-l LIMIT_IOPS] [-c same|split]\n", argv[0]);
            return 2;
        }
    }
    if (rounds < 10 || (cpus && strcmp(cpus, "same") && strcmp(cpus, "split"))) {
        fprintf(stderr, "hop-floor: bad arguments\n");
        return 2;
    }

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) {
        perror("socketpair");
        return 1;
    }
    char buf[64] = { 0 };
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {                   /* the "server": answer every request */
        close(sv[0]);
        if (cpus)
            pin(strcmp(cpus, "same") ? 1 : 0);
        while (recv(sv[1], buf, REQ_BYTES, MSG_WAITALL) == REQ_BYTES)
            if (send(sv[1], buf, REP_BYTES, 0) != REP_BYTES)
                break;
        _exit(0);
    }
    close(sv[1]);
    if (cpus)
        pin(0);

    double *lat = malloc(sizeof(*lat) * rounds);
    if (!lat)
        return 1;
    for (int i = 0; i < rounds / 10; i++)          /* warm up */
        if (exchange(sv[0], buf, REQ_BYTES, buf, REP_BYTES) < 0)
            return 1;
    double t0 = now_us();
    for (int i = 0; i < rounds; i++) {
        double a = now_us();
        if (exchange(sv[0], buf, REQ_BYTES, buf, REP_BYTES) < 0) {
            fprintf(stderr, "hop-floor: the child went away\n");
            return 1;
        }
        lat[i] = now_us() - a;
    }
    double total = now_us() - t0;
    close(sv[0]);
    waitpid(child, NULL, 0);

    qsort(lat, rounds, sizeof(*lat), cmp_double);
    double mean = total / rounds;
    printf("round trip over AF_UNIX, %d rounds%s%s: mean %.1f us, p10 %.1f, p50 %.1f, "
           "p90 %.1f (%.0f round trips/s)\n", rounds, cpus ? ", cpus " : "", cpus ? cpus : "",
           mean, lat[rounds / 10], lat[rounds / 2], lat[rounds * 9 / 10], 1e6 / mean);
    if (limit_iops > 0) {
        double dev = 1e6 / limit_iops;
        printf("limit %.0f IOPS (%.1f us a request): a qd1 row through another process "
               "reaches at most %.0f%% of it (mean round trip), %.0f%% (p50)\n",
               limit_iops, dev, 100 * dev / (dev + mean), 100 * dev / (dev + lat[rounds / 2]));
    }
    free(lat);
    return 0;
}
