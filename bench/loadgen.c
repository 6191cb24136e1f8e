/*
 * Herald's WebSocket load generator: one thread, epoll, non-blocking sockets.
 *
 * It is written in C so that it is never the bottleneck of a fan-out run: a
 * Python client spends more CPU parsing a frame than the servers under test
 * spend sending it.  It reports its own CPU time so the runner can show that.
 *
 *   loadgen MODE key=value ...
 *
 * MODE
 *   fanout  S1: `subs` subscribers, one publisher sends `msgs` messages keeping
 *           `inflight` messages not yet received by every subscriber.
 *   rate    S2 / slow-consumer: the publisher sends `rate` messages/s for
 *           `duration` s; `slow` subscribers stop reading after subscribing.
 *   echo    S3: `clients` clients each do `rounds` sequential round trips.
 *   idle    S4: open `conns` connections, print "READY ..." and hold them until
 *           a line arrives on stdin.
 *
 * Keys: host port path proto=raw|herald|sio channel size subs msgs inflight rate
 *       duration slow clients rounds conns timeout concurrency port2 ports srcs
 *
 * port2=P sends every odd-numbered connection to a second node on port P (S6).
 * ports=P1,P2,... (overrides port/port2) sends connection i to P[i % count]: several
 * nodes (bench/capacity.py).
 * srcs=A1,A2,... binds connection i's socket to local address A[i % count] before
 * connecting (IP_BIND_ADDRESS_NO_PORT: the port is still picked at connect time), so
 * that more than the ~28k ephemeral ports of one source address reach one server
 * port: srcs=127.0.0.2,127.0.0.3,... (all of 127/8 is loopback on Linux).
 * Realistic modes (issue 19; keys and the Socket.IO framing are documented in
 * the "realistic workloads" section at the end of this file):
 *   s5      many channels: a ramp of publication rates over skewed channels
 *   s8      publish through the protocol: closed loop, then one publisher over capacity
 *   storm   connect storm: time to subscribed at fixed concurrency, then hold
 *
 * proto=raw talks the tutorial's protocol (/ws, /ws_broadcast: every text
 * frame is a message).  proto=herald talks Herald protocol v1 on /connect:
 * connect, subscribe to `channel`, publish commands, ping commands.
 *
 * Payloads carry "#<seq>:<send time in us>#" followed by padding up to `size`
 * bytes; receivers find the marker wherever the server put the text (inside
 * "New message: ..." or a publication's "data"), which gives latency, loss and
 * per-subscriber order checks.  Output: one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { ST_CONNECTING, ST_HANDSHAKE, ST_PROTO_CONNECT, ST_PROTO_SUBSCRIBE, ST_OPEN, ST_CLOSED };
enum role { R_SUB, R_PUB, R_ECHO, R_IDLE };

typedef struct {
    char *data;
    size_t len, cap, off;
} buf_t;

typedef struct conn {
    int fd;
    int idx;
    enum state st;
    enum role role;
    int slow;          /* not reading on purpose (cleared when drained at the end) */
    int stuck;         /* was a slow subscriber: its receipts do not count */
    int want_out;      /* EPOLLOUT armed */
    buf_t rb, wb;
    long received;     /* payload messages received */
    long last_seq;
    long order_errors;
    long rounds_left;  /* echo */
    long sent_at_us;   /* echo: when the pending request left */
    int close_code;    /* close frame seen, -1 if none */
    int eof;
    /* realistic modes (s5 / s8 / storm, see the "realistic workloads" section) */
    int was_open;      /* reached ST_OPEN: its closing counts as a dropped connection */
    int nch;           /* channels (rooms) it joins */
    int ch[8];
    long t_open_us;    /* when its socket was created (storm: time to subscribed) */
} conn_t;

/* ------------------------------------------------------------------ options */
static const char *o_host = "127.0.0.1", *o_path = "/ws_broadcast", *o_proto = "raw", *o_channel = "bench";
static int o_port = 8000, o_size = 100, o_subs = 1000, o_inflight = 10, o_slow = 0, o_clients = 50;
static long o_msgs = 200, o_rounds = 2000, o_conns = 5000;
static double o_rate = 50, o_duration = 10, o_timeout = 30;
static int herald_proto = 0;
static int sio_proto = 0;      /* proto=sio: Engine.IO v4 / Socket.IO v5 framing (realistic modes) */
static int rz = 0;             /* a realistic mode (s5, s8, storm) is running */
static int o_concurrency = 128; /* handshakes in flight while opening connections */
static int o_port2 = 0;         /* a second node: odd-numbered connections go there */
#define MAX_LIST 64
static int o_ports[MAX_LIST], o_nports;  /* ports=: connection i goes to o_ports[i % o_nports] */
static struct in_addr o_srcs[MAX_LIST];  /* srcs=: connection i binds to o_srcs[i % o_nsrcs] */
static int o_nsrcs;
static long closed_open;       /* connections that closed after they were open */

static int ep;
static conn_t *conns;
static int nconns;
static int pending_handshakes, established, failed_connects;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000L + ts.tv_nsec / 1000;
}
static void die(const char *msg) {
    fprintf(stderr, "loadgen: %s: %s\n", msg, strerror(errno));
    exit(2);
}

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->off && b->off == b->len) b->off = b->len = 0;
    if (b->len + extra <= b->cap) return;
    if (b->off) {
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap) return;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data) die("realloc");
    b->cap = cap;
}

static void arm(conn_t *c, int out) {
    if (c->want_out == out) return;
    c->want_out = out;
    int reading = !(c->slow && c->st == ST_OPEN);
    struct epoll_event ev = {.events = (reading ? EPOLLIN : 0) | (out ? EPOLLOUT : 0), .data.u32 = c->idx};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void flush_out(conn_t *c) {
    while (c->wb.len > c->wb.off) {
        ssize_t n = send(c->fd, c->wb.data + c->wb.off, c->wb.len - c->wb.off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) break;
            c->st = ST_CLOSED;
            return;
        }
        c->wb.off += n;
    }
    if (c->wb.off == c->wb.len) c->wb.off = c->wb.len = 0;
    arm(c, c->wb.len > 0);
}

static void send_raw(conn_t *c, const char *data, size_t len) {
    buf_reserve(&c->wb, len);
    memcpy(c->wb.data + c->wb.len, data, len);
    c->wb.len += len;
    if (c->wb.len - c->wb.off == len) flush_out(c); /* nothing was waiting: write now */
}

/* A client frame: masked with the all-zero key (RFC 6455 allows any key; XOR with 0 costs nothing). */
static void send_frame(conn_t *c, int opcode, const char *payload, size_t len) {
    unsigned char hdr[14];
    size_t h = 0;
    hdr[h++] = 0x80 | opcode;
    if (len < 126) {
        hdr[h++] = 0x80 | len;
    } else if (len < 65536) {
        hdr[h++] = 0x80 | 126;
        hdr[h++] = len >> 8;
        hdr[h++] = len & 0xff;
    } else {
        hdr[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) hdr[h++] = (len >> (8 * i)) & 0xff;
    }
    memset(hdr + h, 0, 4);
    h += 4;
    buf_reserve(&c->wb, h + len);
    int was_empty = c->wb.len == c->wb.off;
    memcpy(c->wb.data + c->wb.len, hdr, h);
    memcpy(c->wb.data + c->wb.len + h, payload, len);
    c->wb.len += h + len;
    if (was_empty) flush_out(c);
}

static void send_text(conn_t *c, const char *s) { send_frame(c, 1, s, strlen(s)); }

/* ------------------------------------------------------------------ payloads */
static char *padding;

/* "#seq:us#" + padding to o_size bytes (at least the marker). */
static int make_payload(char *out, long seq) {
    int n = sprintf(out, "#%ld:%ld#", seq, now_us());
    if (n < o_size) {
        memcpy(out + n, padding, o_size - n);
        n = o_size;
    }
    out[n] = 0;
    return n;
}

static int parse_marker(const char *p, size_t len, long *seq, long *ts) {
    const char *end = p + len;
    const char *m = memchr(p, '#', len);
    if (!m) return 0;
    m++;
    long a = 0, b = 0;
    if (m >= end || *m < '0' || *m > '9') return 0;
    while (m < end && *m >= '0' && *m <= '9') a = a * 10 + (*m++ - '0');
    if (m >= end || *m != ':') return 0;
    m++;
    while (m < end && *m >= '0' && *m <= '9') b = b * 10 + (*m++ - '0');
    *seq = a;
    *ts = b;
    return 1;
}

/* ------------------------------------------------------------------ results */
static long total_delivered, total_expected;
static long *seq_count;     /* per message: subscribers that got it */
static long seq_cap, completed, sent;
static long active_subs;
static double *lat;         /* latencies in ms */
static long nlat, lat_cap;
static double t_first_send, t_last_recv;
static conn_t *publisher;
static long next_cmd_id = 10;

static void record_latency(double ms) {
    if (nlat == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 1 << 16;
        lat = realloc(lat, lat_cap * sizeof(double));
        if (!lat) die("realloc");
    }
    lat[nlat++] = ms;
}

static void on_payload(conn_t *c, const char *p, size_t len) {
    long seq, ts;
    if (c->role == R_ECHO) {
        c->received++;
        if (c->rounds_left > 0) {
            c->rounds_left--;
            record_latency((now_us() - c->sent_at_us) / 1000.0);
        }
        return;
    }
    if (c->role != R_SUB || !parse_marker(p, len, &seq, &ts)) return;
    long t = now_us();
    c->received++;
    if (c->stuck) return;
    total_delivered++;
    if (seq <= c->last_seq) c->order_errors++;
    c->last_seq = seq;
    record_latency((t - ts) / 1000.0);
    t_last_recv = now_s();
    if (seq >= 0 && seq < seq_cap) {
        if (++seq_count[seq] == active_subs) completed++;
    }
}

static void echo_send(conn_t *c) {
    char msg[70000];
    c->sent_at_us = now_us();
    if (herald_proto) {
        /* Protocol v1's ping command: the cheapest full command round trip. */
        snprintf(msg, sizeof msg, "{\"id\":%ld,\"type\":\"ping\"}", next_cmd_id++);
    } else {
        make_payload(msg, c->rounds_left);
    }
    send_text(c, msg);
}

static void rz_on_text(conn_t *c, const char *p, size_t len);
static void rz_on_handshake(conn_t *c);

/* A whole text frame arrived on c. */
static void on_text(conn_t *c, const char *p, size_t len) {
    if (rz) {
        rz_on_text(c, p, len);
        return;
    }
    if (herald_proto) {
        if (len >= 15 && memcmp(p, "{\"type\":\"ping\"}", 15) == 0) {
            send_text(c, "{\"type\":\"pong\"}");
            return;
        }
        if (c->st == ST_PROTO_CONNECT) {
            if (memmem(p, len, "\"error\"", 7)) {
                fprintf(stderr, "loadgen: connect refused: %.*s\n", (int)len, p);
                c->st = ST_CLOSED;
                return;
            }
            if (c->role == R_SUB || c->role == R_IDLE) {
                char cmd[512];
                snprintf(cmd, sizeof cmd,
                         "{\"id\":2,\"type\":\"subscribe\",\"channels\":[{\"channel\":\"%s\"}]}", o_channel);
                send_text(c, cmd);
                c->st = ST_PROTO_SUBSCRIBE;
            } else {
                c->st = ST_OPEN;
                established++;
                pending_handshakes--;
            }
            return;
        }
        if (c->st == ST_PROTO_SUBSCRIBE) {
            if (memmem(p, len, "\"id\":2", 6)) {
                if (memmem(p, len, "\"error\"", 7)) {
                    fprintf(stderr, "loadgen: subscribe refused: %.*s\n", (int)len, p);
                    c->st = ST_CLOSED;
                    return;
                }
                c->st = ST_OPEN;
                established++;
                pending_handshakes--;
            }
            return;
        }
        if (c->role == R_PUB) return; /* publish replies */
        if (c->role == R_ECHO) {
            on_payload(c, p, len);
            return;
        }
        if (len > 25 && memcmp(p, "{\"type\":\"publication\"", 21) != 0) return;
    }
    on_payload(c, p, len);
}

static void handle_frames(conn_t *c) {
    buf_t *b = &c->rb;
    for (;;) {
        unsigned char *p = (unsigned char *)b->data + b->off;
        size_t avail = b->len - b->off;
        if (avail < 2) return;
        int opcode = p[0] & 0x0f;
        uint64_t plen = p[1] & 0x7f;
        size_t h = 2;
        if (plen == 126) {
            if (avail < 4) return;
            plen = (p[2] << 8) | p[3];
            h = 4;
        } else if (plen == 127) {
            if (avail < 10) return;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = (plen << 8) | p[2 + i];
            h = 10;
        }
        if (p[1] & 0x80) h += 4; /* servers never mask; tolerate it anyway */
        if (avail < h + plen) {
            buf_reserve(b, h + plen - avail);
            return;
        }
        const char *payload = (const char *)p + h;
        b->off += h + plen;
        switch (opcode) {
        case 1:
        case 2:
        case 0:
            on_text(c, payload, plen);
            break;
        case 8:
            c->close_code = plen >= 2 ? (((unsigned char)payload[0]) << 8) | (unsigned char)payload[1] : 1005;
            c->st = ST_CLOSED;
            return;
        case 9:
            send_frame(c, 10, payload, plen);
            break;
        default:
            break;
        }
        if (b->off == b->len) b->off = b->len = 0;
    }
}

static void on_handshake_done(conn_t *c) {
    if (rz) {
        rz_on_handshake(c);
        return;
    }
    if (herald_proto) {
        send_text(c, "{\"id\":1,\"type\":\"connect\"}");
        c->st = ST_PROTO_CONNECT;
    } else {
        c->st = ST_OPEN;
        established++;
        pending_handshakes--;
    }
}

static void read_conn(conn_t *c) {
    for (;;) {
        buf_reserve(&c->rb, 65536);
        ssize_t n = recv(c->fd, c->rb.data + c->rb.len, c->rb.cap - c->rb.len, 0);
        if (n == 0) {
            c->eof = 1;
            if (c->st != ST_OPEN && c->st != ST_CLOSED) {
                failed_connects++;
                pending_handshakes--;
            }
            c->st = ST_CLOSED;
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN) return;
            c->eof = 1;
            c->st = ST_CLOSED;
            return;
        }
        c->rb.len += n;
        if (c->st == ST_HANDSHAKE) {
            char *end = memmem(c->rb.data + c->rb.off, c->rb.len - c->rb.off, "\r\n\r\n", 4);
            if (!end) continue;
            if (strncmp(c->rb.data + c->rb.off, "HTTP/1.1 101", 12) != 0) {
                fprintf(stderr, "loadgen: handshake refused: %.40s\n", c->rb.data + c->rb.off);
                c->st = ST_CLOSED;
                failed_connects++;
                pending_handshakes--;
                return;
            }
            c->rb.off = end + 4 - c->rb.data;
            on_handshake_done(c);
        }
        handle_frames(c);
        if (c->st == ST_CLOSED) return;
        if (c->slow && c->st == ST_OPEN) { /* stop reading from now on */
            struct epoll_event ev = {.events = c->want_out ? EPOLLOUT : 0, .data.u32 = c->idx};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            return;
        }
    }
}

static void start_handshake(conn_t *c) {
    char req[1024];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                     o_path, o_host, o_port, herald_proto ? "Sec-WebSocket-Protocol: herald.v1\r\n" : "");
    c->st = ST_HANDSHAKE;
    send_raw(c, req, n);
}

static void open_conn(conn_t *c, int idx, enum role role, int slow) {
    memset(c, 0, sizeof *c);
    c->idx = idx;
    c->role = role;
    c->slow = slow;
    c->stuck = slow;
    c->last_seq = -1;
    c->close_code = -1;
    c->t_open_us = now_us();
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket (raise ulimit -n)");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (slow) {
        int small = 4096; /* so the server's buffers fill quickly */
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    }
    if (o_nsrcs) {
        int no_port = 1; /* bind the address only; connect() picks the port per 4-tuple */
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &no_port, sizeof no_port);
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr = o_srcs[idx % o_nsrcs]};
        if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind (srcs=)");
    }
    int port = o_nports ? o_ports[idx % o_nports] : (o_port2 && (idx & 1) ? o_port2 : o_port);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, o_host, &sa.sin_addr);
    c->st = ST_CONNECTING;
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) die("connect");
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = idx};
    c->want_out = 1;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
    pending_handshakes++;
}

static void on_event(conn_t *c, uint32_t events) {
    if (c->st == ST_CONNECTING && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) {
            c->st = ST_CLOSED;
            failed_connects++;
            pending_handshakes--;
            arm(c, 0);
            return;
        }
        start_handshake(c);
    }
    if (events & EPOLLOUT) flush_out(c);
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && c->st != ST_CLOSED) read_conn(c);
    if (c->st == ST_CLOSED && c->fd >= 0) {
        if (c->was_open) {
            c->was_open = 0;
            closed_open++;
        }
        struct epoll_event ev = {0};
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, &ev);
    }
}

static void poll_once(int timeout_ms) {
    struct epoll_event evs[512];
    int n = epoll_wait(ep, evs, 512, timeout_ms);
    for (int i = 0; i < n; i++) on_event(&conns[evs[i].data.u32], evs[i].events);
}

/* Open conns[first..first+count) with at most 128 handshakes in flight. */
static double open_all(int first, int count, enum role role, int nslow) {
    double t0 = now_s();
    int opened = 0;
    while (opened < count || pending_handshakes > 0) {
        while (opened < count && pending_handshakes < o_concurrency) {
            int slow = opened >= count - nslow;
            open_conn(&conns[first + opened], first + opened, role, slow);
            opened++;
        }
        poll_once(50);
        if (now_s() - t0 > o_timeout) {
            fprintf(stderr, "loadgen: timed out opening connections (%d pending)\n", pending_handshakes);
            exit(3);
        }
    }
    return now_s() - t0;
}

static void send_publication(long seq) {
    char pay[65600], msg[66000];
    make_payload(pay, seq);
    if (herald_proto) {
        snprintf(msg, sizeof msg, "{\"id\":%ld,\"type\":\"publish\",\"channel\":\"%s\",\"data\":\"%s\"}",
                 next_cmd_id++, o_channel, pay);
        send_text(publisher, msg);
    } else {
        send_text(publisher, pay);
    }
    if (sent == 0) t_first_send = now_s();
    sent++;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double q) {
    if (!nlat) return 0;
    long i = (long)(q / 100.0 * (nlat - 1) + 0.5);
    return lat[i];
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void print_latency_json(void) {
    qsort(lat, nlat, sizeof(double), cmp_double);
    printf("\"latency_ms\":{\"count\":%ld,\"p50\":%.3f,\"p75\":%.3f,\"p90\":%.3f,\"p95\":%.3f,\"p99\":%.3f,"
           "\"p999\":%.3f,\"max\":%.3f}",
           nlat, pct(50), pct(75), pct(90), pct(95), pct(99), pct(99.9), nlat ? lat[nlat - 1] : 0.0);
}

/* After a run: read whatever the slow subscribers have buffered to see how the server closed them. */
static void drain_slow(int first, int count) {
    double t0 = now_s();
    for (int i = first; i < first + count; i++) {
        conn_t *c = &conns[i];
        if (!c->slow) continue;
        c->slow = 0;
        int big = 4 << 20; /* a tiny window would trickle the backlog in slowly */
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
        while (c->st != ST_CLOSED && now_s() - t0 < 5) {
            struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
            if (poll(&pfd, 1, 200) <= 0) break;
            read_conn(c);
        }
    }
}

static int run_pubsub(int mode_rate) {
    int total = o_subs + 1;
    conns = calloc(total, sizeof(conn_t));
    nconns = total;
    double t_conn = open_all(0, o_subs, R_SUB, o_slow);
    if (failed_connects) {
        fprintf(stderr, "loadgen: %d connections failed\n", failed_connects);
        return 3;
    }
    open_all(o_subs, 1, R_PUB, 0);
    publisher = &conns[o_subs];
    active_subs = o_subs - o_slow;
    double cpu0 = cpu_seconds();
    long planned = mode_rate ? (long)(o_rate * o_duration + 0.5) : o_msgs;
    seq_cap = planned;
    seq_count = calloc(planned + 1, sizeof(long));
    double deadline, t0 = now_s();
    if (!mode_rate) {
        deadline = t0 + o_timeout;
        while (completed < planned && now_s() < deadline) {
            while (sent < planned && sent - completed < o_inflight) send_publication(sent);
            poll_once(100);
        }
    } else {
        double interval = 1.0 / o_rate;
        double next = t0;
        while (sent < planned) {
            double t = now_s();
            if (t >= next) {
                send_publication(sent);
                next += interval;
                continue;
            }
            int ms = (int)((next - t) * 1000);
            poll_once(ms > 0 ? ms : 0);
        }
        deadline = now_s() + 5 + o_timeout / 10;
        while (completed < planned && now_s() < deadline) poll_once(50);
    }
    double elapsed = (t_last_recv > t_first_send ? t_last_recv : now_s()) - t_first_send;
    double cpu = cpu_seconds() - cpu0;
    long order_errors = 0, slow_closed = 0, slow_code = -1, dropped = 0;
    total_expected = (long)active_subs * sent;
    drain_slow(0, o_subs);
    for (int i = 0; i < o_subs; i++) {
        conn_t *c = &conns[i];
        order_errors += c->order_errors;
        if (c->stuck) {
            if (c->close_code >= 0 || c->eof) slow_closed++;
            if (c->close_code >= 0) slow_code = c->close_code;
        } else if (c->st == ST_CLOSED) {
            dropped++;
        }
    }
    /* Slow subscribers' receipts do not count towards delivery. */
    long fast_delivered = 0;
    for (int i = 0; i < o_subs; i++)
        if (!conns[i].stuck) fast_delivered += conns[i].received;
    printf("{\"mode\":\"%s\",\"subs\":%d,\"slow\":%d,\"sent\":%ld,\"expected\":%ld,\"delivered\":%ld,"
           "\"lost\":%ld,\"order_errors\":%ld,\"dropped_connections\":%ld,\"slow_closed\":%ld,"
           "\"slow_close_code\":%ld,\"elapsed_s\":%.4f,\"msgs_per_s\":%.1f,\"connect_s\":%.3f,"
           "\"loadgen_cpu_s\":%.3f,\"loadgen_cpu_pct\":%.1f,",
           mode_rate ? "rate" : "fanout", o_subs, o_slow, sent, total_expected, fast_delivered,
           total_expected - fast_delivered, order_errors, dropped, slow_closed, slow_code, elapsed,
           elapsed > 0 ? fast_delivered / elapsed : 0, t_conn, cpu, elapsed > 0 ? 100 * cpu / elapsed : 0);
    print_latency_json();
    printf("}\n");
    return 0;
}

static int run_echo(void) {
    conns = calloc(o_clients, sizeof(conn_t));
    nconns = o_clients;
    open_all(0, o_clients, R_ECHO, 0);
    if (failed_connects) return 3;
    double cpu0 = cpu_seconds(), t0 = now_s();
    for (int i = 0; i < o_clients; i++) {
        conns[i].rounds_left = o_rounds;
        conns[i].received = 0;
        echo_send(&conns[i]);
    }
    long done_clients = 0, total = 0;
    double deadline = t0 + o_timeout;
    while (done_clients < o_clients && now_s() < deadline) {
        struct epoll_event evs[512];
        int n = epoll_wait(ep, evs, 512, 100);
        for (int i = 0; i < n; i++) {
            conn_t *c = &conns[evs[i].data.u32];
            long before = c->rounds_left;
            on_event(c, evs[i].events);
            /* one reply per round trip: send the next request as soon as the previous reply came */
            if (c->rounds_left < before) {
                if (c->rounds_left > 0) echo_send(c);
                else done_clients++;
            }
        }
    }
    double elapsed = now_s() - t0, cpu = cpu_seconds() - cpu0;
    for (int i = 0; i < o_clients; i++) total += o_rounds - conns[i].rounds_left;
    printf("{\"mode\":\"echo\",\"clients\":%d,\"rounds\":%ld,\"round_trips\":%ld,\"lost\":%ld,"
           "\"elapsed_s\":%.4f,\"round_trips_per_s\":%.1f,\"loadgen_cpu_s\":%.3f,\"loadgen_cpu_pct\":%.1f,",
           o_clients, o_rounds, total, o_clients * o_rounds - total, elapsed, total / elapsed, cpu,
           100 * cpu / elapsed);
    print_latency_json();
    printf("}\n");
    return 0;
}

static int run_idle(void) {
    conns = calloc(o_conns, sizeof(conn_t));
    nconns = o_conns;
    double t = open_all(0, o_conns, R_IDLE, 0);
    printf("READY {\"mode\":\"idle\",\"conns\":%ld,\"established\":%d,\"failed\":%d,\"connect_s\":%.3f,"
           "\"connects_per_s\":%.1f}\n",
           o_conns, established, failed_connects, t, established / t);
    fflush(stdout);
    /* Hold the connections (answering pings) until the runner writes a line. */
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0xffffffff};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    double deadline = now_s() + 600;
    while (now_s() < deadline) {
        struct epoll_event evs[512];
        int n = epoll_wait(ep, evs, 512, 1000);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u32 == 0xffffffff) return 0;
            on_event(&conns[evs[i].data.u32], evs[i].events);
        }
    }
    return 0;
}

/* ================================================================== realistic workloads
 *
 * Modes s5, s8 and storm (issue 19), driven by bench/realistic.py.  They speak
 * three protocols, chosen with proto=:
 *
 *   herald  protocol v1 on /connect: {"id":1,"type":"connect"[,"token":T]},
 *           one subscribe command naming every channel of the connection
 *           (id 2), publish commands {"id":N,"type":"publish","channel":C,
 *           "data":"<payload>"} answered by {"id":N,...}; publications arrive
 *           as {"type":"publication",...}; {"type":"ping"} is answered.
 *   sio     Socket.IO v5 over Engine.IO v4 on a plain WebSocket
 *           (path=/socket.io/?EIO=4&transport=websocket), no polling upgrade:
 *             server "0{...}"   Engine.IO open     -> client "40" or "40{"token":T}"
 *             server "40{...}"  namespace "/" connected (server "44{...}": refused)
 *             server "2"        Engine.IO ping     -> client "3" (pong)
 *             client "42<id>[\"join\",[\"c1\",...]]"  join rooms, ack "43<id>[...]"
 *             client "42[<id>][\"pub\",{\"room\":R,\"data\":\"<payload>\"}]"
 *             server "42[\"msg\",\"<payload>\"]"        a publication
 *           The peers in bench/baselines/ implement "join" and "pub" with their
 *           own rooms/groups API and answer an ack when one is asked for.
 *   raw     the tutorial's framing (storm on /ws_broadcast only: ready at 101).
 *
 * Every connection joins its channels (named prefix + index) before it counts as
 * open.  Keys: prefix, channels (number of channels), per (channels per
 * connection), cap (members per channel), big (members of channel 0, 0: none),
 * pubs (publishers), rates (comma list of publications/s), step (s per rate),
 * warmup (s at the first rate before the ramp, not reported), idle and
 * idle_rate (s at a trickle of publications/s after the set-up: server CPU share),
 * drain (s to wait for a step's deliveries), p99 (ms, the step's goal),
 * stop_fail (consecutive failing steps that end the ramp), empty (s8: seconds of
 * publications to channels nobody joined first), probes (publications
 * to the big channel, one at a time), seed, server_pids (comma list: their CPU
 * time is read from /proc/PID/stat around every step), rooms, room_size,
 * over_rate, over_factor, over_duration, tokens (a file, one connection token a
 * line), concurrency (handshakes in flight).
 */

static const char *o_prefix = "bench:c", *o_rates = "100,200", *o_tokens_file = NULL, *o_server_pids = "";
static int o_nch = 2000, o_per = 5, o_cap = 500, o_big = 0, o_pubs = 1, o_stop_fail = 2, o_probes = 20;
static int o_rooms = 1000, o_room_size = 10;
static double o_empty = 0;
static double o_idle = 0, o_idle_rate = 10, o_warmup = 0, o_step = 10, o_drain = 5, o_p99 = 50, o_over_rate = 0, o_over_factor = 2, o_over_duration = 5;
static unsigned long long rng_state = 0x9E3779B97F4A7C15ULL;

static int rz_option(const char *k, const char *v) {
    if (!strcmp(k, "prefix")) o_prefix = v;
    else if (!strcmp(k, "channels")) o_nch = atoi(v);
    else if (!strcmp(k, "per")) o_per = atoi(v);
    else if (!strcmp(k, "cap")) o_cap = atoi(v);
    else if (!strcmp(k, "big")) o_big = atoi(v);
    else if (!strcmp(k, "pubs")) o_pubs = atoi(v);
    else if (!strcmp(k, "rates")) o_rates = v;
    else if (!strcmp(k, "step")) o_step = atof(v);
    else if (!strcmp(k, "warmup")) o_warmup = atof(v);
    else if (!strcmp(k, "idle")) o_idle = atof(v);
    else if (!strcmp(k, "idle_rate")) o_idle_rate = atof(v);
    else if (!strcmp(k, "drain")) o_drain = atof(v);
    else if (!strcmp(k, "p99")) o_p99 = atof(v);
    else if (!strcmp(k, "stop_fail")) o_stop_fail = atoi(v);
    else if (!strcmp(k, "probes")) o_probes = atoi(v);
    else if (!strcmp(k, "seed")) rng_state = strtoull(v, NULL, 10) * 0x9E3779B97F4A7C15ULL + 1;
    else if (!strcmp(k, "server_pids")) o_server_pids = v;
    else if (!strcmp(k, "rooms")) o_rooms = atoi(v);
    else if (!strcmp(k, "room_size")) o_room_size = atoi(v);
    else if (!strcmp(k, "empty")) o_empty = atof(v);
    else if (!strcmp(k, "over_rate")) o_over_rate = atof(v);
    else if (!strcmp(k, "over_factor")) o_over_factor = atof(v);
    else if (!strcmp(k, "over_duration")) o_over_duration = atof(v);
    else if (!strcmp(k, "tokens")) o_tokens_file = v;
    else return 0;
    return 1;
}

static unsigned long long rng_next(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}
static double rng_unit(void) { return (rng_next() >> 11) * (1.0 / 9007199254740992.0); }

/* ------------------------------------------------------------------ latency sets */
typedef struct {
    double *v;
    long n, cap;
} lat_t;

static void lat_add(lat_t *l, double ms) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 1 << 14;
        l->v = realloc(l->v, l->cap * sizeof(double));
        if (!l->v) die("realloc");
    }
    l->v[l->n++] = ms;
}
static double lat_pct(lat_t *l, double q) { /* l sorted */
    if (!l->n) return 0;
    return l->v[(long)(q / 100.0 * (l->n - 1) + 0.5)];
}
static void lat_json(const char *name, lat_t *l) {
    qsort(l->v, l->n, sizeof(double), cmp_double);
    printf("\"%s\":{\"count\":%ld,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f}", name, l->n,
           lat_pct(l, 50), lat_pct(l, 90), lat_pct(l, 99), lat_pct(l, 99.9), l->n ? l->v[l->n - 1] : 0.0);
}

/* ------------------------------------------------------------------ server CPU */
static double server_cpu_seconds(void) {
    double total = 0;
    const char *p = o_server_pids;
    while (*p) {
        long pid = strtol(p, (char **)&p, 10);
        if (*p == ',') p++;
        if (pid <= 0) break;
        char path[64], text[1024];
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        size_t n = fread(text, 1, sizeof text - 1, f);
        fclose(f);
        text[n] = 0;
        char *r = strrchr(text, ')');
        if (!r) continue;
        /* after ")": state(1) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime(12) stime(13) */
        long utime = 0, stime = 0;
        char *q = r + 2;
        for (int field = 1; field <= 13 && *q; field++) {
            if (field == 12) utime = atol(q);
            if (field == 13) stime = atol(q);
            q = strchr(q, ' ');
            if (!q) break;
            q++;
        }
        total += (double)(utime + stime) / sysconf(_SC_CLK_TCK);
    }
    return total;
}

/* ------------------------------------------------------------------ publications */
static int *seq_ch;      /* per publication: its channel (-1: none) */
static int *seq_step;    /* per publication: its ramp step (-1: a probe, -2: S8) */
static int *seq_got;     /* per publication: receipts */
static char *seq_acked;  /* per publication: 1 acknowledged, 2 refused */
static long nseq, seq_alloc;
static int *members;     /* per channel: connections joined */
static char **tokens;
static long ntokens;

static long new_seq(int ch, int step) {
    if (nseq == seq_alloc) {
        seq_alloc = seq_alloc ? seq_alloc * 2 : 1 << 16;
        seq_ch = realloc(seq_ch, seq_alloc * sizeof(int));
        seq_step = realloc(seq_step, seq_alloc * sizeof(int));
        seq_got = realloc(seq_got, seq_alloc * sizeof(int));
        seq_acked = realloc(seq_acked, seq_alloc);
        if (!seq_ch || !seq_step || !seq_got || !seq_acked) die("realloc");
    }
    seq_ch[nseq] = ch;
    seq_step[nseq] = step;
    seq_got[nseq] = 0;
    seq_acked[nseq] = 0;
    return nseq++;
}

/* The step whose receipts are being counted, and its tallies. */
static int cur_step = -100;
static long step_delivered, late_receipts, stray_receipts, publish_errors;
static lat_t step_lat;
static double t_step_last_recv;
/* The probe in flight (S5-big). */
static long probe_seq = -1, probe_got;
static long probe_first_us, probe_last_us;

static void rz_on_pub(conn_t *c, const char *p, size_t len) {
    long seq, ts;
    if (!parse_marker(p, len, &seq, &ts) || seq < 0 || seq >= nseq) {
        stray_receipts++;
        return;
    }
    long t = now_us();
    c->received++;
    seq_got[seq]++;
    int step = seq_step[seq];
    if (step == -1) {
        if (seq == probe_seq) {
            if (!probe_got) probe_first_us = t;
            probe_got++;
            probe_last_us = t;
        }
        return;
    }
    if (step == cur_step) {
        step_delivered++;
        lat_add(&step_lat, (t - ts) / 1000.0);
        t_step_last_recv = now_s();
    } else {
        late_receipts++;
    }
}

/* S8's acknowledgement bookkeeping. */
static lat_t ack_lat;
static long acks, refusals;
static void (*on_ack_hook)(conn_t *c, long seq, int refused);

static void rz_on_ack(conn_t *c, long id, int refused) {
    long seq = id - 100;
    if (seq < 0 || seq >= nseq) return;
    if (refused) {
        publish_errors++;
        if (publish_errors <= 3) fprintf(stderr, "loadgen: publish refused (seq %ld)\n", seq);
    }
    seq_acked[seq] = refused ? 2 : 1;
    if (on_ack_hook) on_ack_hook(c, seq, refused);
}

/* ------------------------------------------------------------------ protocol */
static int storm_mode;
static lat_t ready_lat;

static void rz_ready(conn_t *c) {
    c->st = ST_OPEN;
    c->was_open = 1;
    established++;
    pending_handshakes--;
    if (storm_mode) lat_add(&ready_lat, (now_us() - c->t_open_us) / 1000.0);
}

static void rz_fail(conn_t *c, const char *what, const char *p, size_t len) {
    if (failed_connects < 3) fprintf(stderr, "loadgen: %s: %.*s\n", what, (int)(len > 300 ? 300 : len), p);
    c->st = ST_CLOSED;
    failed_connects++;
    pending_handshakes--;
}

static void rz_send_join(conn_t *c) {
    char cmd[8192];
    size_t n;
    if (sio_proto) {
        n = snprintf(cmd, sizeof cmd, "422[\"join\",[");
        for (int i = 0; i < c->nch; i++)
            n += snprintf(cmd + n, sizeof cmd - n, "%s\"%s%d\"", i ? "," : "", o_prefix, c->ch[i]);
        n += snprintf(cmd + n, sizeof cmd - n, "]]");
    } else {
        n = snprintf(cmd, sizeof cmd, "{\"id\":2,\"type\":\"subscribe\",\"channels\":[");
        for (int i = 0; i < c->nch; i++)
            n += snprintf(cmd + n, sizeof cmd - n, "%s{\"channel\":\"%s%d\"}", i ? "," : "", o_prefix, c->ch[i]);
        n += snprintf(cmd + n, sizeof cmd - n, "]}");
    }
    send_frame(c, 1, cmd, n);
    c->st = ST_PROTO_SUBSCRIBE;
}

static void rz_joined_or_ready(conn_t *c) {
    if (c->nch > 0) rz_send_join(c);
    else rz_ready(c);
}

static const char *token_for(conn_t *c) { return ntokens ? tokens[c->idx % ntokens] : NULL; }

static void rz_on_handshake(conn_t *c) {
    if (herald_proto) {
        char cmd[9000];
        const char *token = token_for(c);
        if (token) snprintf(cmd, sizeof cmd, "{\"id\":1,\"type\":\"connect\",\"token\":\"%s\"}", token);
        else snprintf(cmd, sizeof cmd, "{\"id\":1,\"type\":\"connect\"}");
        send_text(c, cmd);
        c->st = ST_PROTO_CONNECT;
    } else if (sio_proto) {
        c->st = ST_PROTO_CONNECT; /* wait for the Engine.IO open packet */
    } else {
        rz_ready(c);
    }
}

static long parse_long(const char *p, const char *end, const char **after) {
    long v = 0;
    while (p < end && *p >= '0' && *p <= '9') v = v * 10 + (*p++ - '0');
    if (after) *after = p;
    return v;
}

static void rz_on_text(conn_t *c, const char *p, size_t len) {
    const char *end = p + len;
    if (herald_proto) {
        if (len >= 21 && memcmp(p, "{\"type\":\"publication\"", 21) == 0) {
            rz_on_pub(c, p, len);
            return;
        }
        if (len >= 6 && memcmp(p, "{\"id\":", 6) == 0) {
            const char *after;
            long id = parse_long(p + 6, end, &after);
            int refused = memmem(p, len, "\"error\"", 7) != NULL;
            if (c->st == ST_PROTO_CONNECT && id == 1) {
                if (refused) rz_fail(c, "connect refused", p, len);
                else rz_joined_or_ready(c);
            } else if (c->st == ST_PROTO_SUBSCRIBE && id == 2) {
                if (refused) rz_fail(c, "subscribe refused", p, len);
                else rz_ready(c);
            } else {
                rz_on_ack(c, id, refused);
            }
            return;
        }
        if (len >= 15 && memcmp(p, "{\"type\":\"ping\"}", 15) == 0) send_text(c, "{\"type\":\"pong\"}");
        return; /* join/leave and other pushes */
    }
    if (sio_proto) {
        if (len == 1 && p[0] == '2') {
            send_frame(c, 1, "3", 1);
            return;
        }
        if (len >= 7 && memcmp(p, "42[\"msg\"", 7) == 0) {
            rz_on_pub(c, p, len);
            return;
        }
        if (len >= 3 && p[0] == '4' && p[1] == '3') {
            const char *after;
            long id = parse_long(p + 2, end, &after);
            int refused = memmem(p, len, "\"error\"", 7) != NULL;
            if (c->st == ST_PROTO_SUBSCRIBE && id == 2) {
                if (refused) rz_fail(c, "join refused", p, len);
                else rz_ready(c);
            } else {
                rz_on_ack(c, id, refused);
            }
            return;
        }
        if (len >= 1 && p[0] == '0' && c->st == ST_PROTO_CONNECT) {
            char cmd[9000];
            const char *token = token_for(c);
            if (token) snprintf(cmd, sizeof cmd, "40{\"token\":\"%s\"}", token);
            else snprintf(cmd, sizeof cmd, "40");
            send_text(c, cmd);
            return;
        }
        if (len >= 2 && p[0] == '4' && p[1] == '0' && c->st == ST_PROTO_CONNECT) {
            rz_joined_or_ready(c);
            return;
        }
        if (len >= 2 && p[0] == '4' && p[1] == '4' && c->st == ST_PROTO_CONNECT) {
            rz_fail(c, "socket.io connect refused", p, len);
            return;
        }
        if (len >= 2 && p[0] == '4' && p[1] == '1') c->st = ST_CLOSED; /* server disconnect */
        return;
    }
    rz_on_pub(c, p, len); /* raw */
}

/* A publication of `seq` to channel `ch` from publisher `c`; asks an ack if `ack`. */
static void rz_publish(conn_t *c, long seq, int ch, int ack) {
    static char pay[65600], msg[66200];
    make_payload(pay, seq);
    int n;
    if (herald_proto) {
        n = snprintf(msg, sizeof msg, "{\"id\":%ld,\"type\":\"publish\",\"channel\":\"%s%d\",\"data\":\"%s\"}",
                     seq + 100, o_prefix, ch, pay);
    } else if (ack) {
        n = snprintf(msg, sizeof msg, "42%ld[\"pub\",{\"room\":\"%s%d\",\"data\":\"%s\"}]", seq + 100, o_prefix,
                     ch, pay);
    } else {
        n = snprintf(msg, sizeof msg, "42[\"pub\",{\"room\":\"%s%d\",\"data\":\"%s\"}]", o_prefix, ch, pay);
    }
    send_frame(c, 1, msg, n);
}

static void load_tokens(void) {
    if (!o_tokens_file) return;
    FILE *f = fopen(o_tokens_file, "r");
    if (!f) die("tokens file");
    char line[9000];
    long cap = 0;
    while (fgets(line, sizeof line, f)) {
        size_t n = strcspn(line, "\r\n");
        line[n] = 0;
        if (!n) continue;
        if (ntokens == cap) {
            cap = cap ? cap * 2 : 1024;
            tokens = realloc(tokens, cap * sizeof(char *));
            if (!tokens) die("realloc");
        }
        tokens[ntokens++] = strdup(line);
    }
    fclose(f);
}

/* Opens conns[first..first+count) that join the channels already in their ch[]. */
static double rz_open(int first, int count, enum role role) {
    double t0 = now_s();
    int opened = 0;
    while (opened < count || pending_handshakes > 0) {
        while (opened < count && pending_handshakes < o_concurrency) {
            conn_t *c = &conns[first + opened];
            int nch = c->nch, ch[8];
            memcpy(ch, c->ch, sizeof ch);
            open_conn(c, first + opened, role, 0);
            c->nch = nch;
            memcpy(c->ch, ch, sizeof ch);
            opened++;
        }
        poll_once(50);
        if (now_s() - t0 > o_timeout) {
            fprintf(stderr, "loadgen: timed out opening connections (%d pending, %d failed)\n", pending_handshakes,
                    failed_connects);
            exit(3);
        }
    }
    return now_s() - t0;
}

static void poll_until(double t_end) {
    for (;;) {
        double left = t_end - now_s();
        if (left <= 0) return;
        poll_once(left > 0.05 ? 50 : (int)(left * 1000));
    }
}

static size_t backlog(conn_t *c) { return c->wb.len - c->wb.off; }

/* ------------------------------------------------------------------ s5: many channels */
/* Each of `subs` connections joins `per` distinct channels of `channels`, drawn
 * with weight 1/rank and at most `cap` members a channel; with big=N, channel 0
 * holds the first N connections instead and is never drawn.  Publishers send to
 * channels drawn uniformly at a fixed total rate, ramped through `rates`. */
static void assign_channels(int nsubs) {
    members = calloc(o_nch, sizeof(int));
    double *cum = malloc(o_nch * sizeof(double));
    double total = 0;
    for (int i = 0; i < o_nch; i++) {
        total += (o_big && i == 0) ? 0 : 1.0 / (i + 1 - (o_big ? 1 : 0));
        cum[i] = total;
    }
    if (o_per > 8) o_per = 8;
    for (int s = 0; s < nsubs; s++) {
        conn_t *c = &conns[s];
        c->nch = 0;
        if (o_big && s < o_big) {
            c->ch[c->nch++] = 0;
            members[0]++;
        }
        int tries = 0;
        while (c->nch < o_per && tries < 100000) {
            tries++;
            double u = rng_unit() * total;
            int lo = 0, hi = o_nch - 1;
            while (lo < hi) {
                int mid = (lo + hi) / 2;
                if (cum[mid] < u) lo = mid + 1;
                else hi = mid;
            }
            if ((o_big && lo == 0) || members[lo] >= o_cap) continue;
            int dup = 0;
            for (int k = 0; k < c->nch; k++) dup |= c->ch[k] == lo;
            if (dup) continue;
            c->ch[c->nch++] = lo;
            members[lo]++;
        }
    }
    free(cum);
}

static void s5_step_json(int step, double rate, long sent, double send_s, long expected, double cpu, int pass,
                         size_t max_backlog, long dropped) {
    long lost = expected - step_delivered;
    printf("%s{\"step\":%d,\"rate\":%.1f,\"sent\":%ld,\"sent_per_s\":%.1f,\"expected\":%ld,\"delivered\":%ld,"
           "\"lost\":%ld,\"late\":%ld,\"dropped_connections\":%ld,\"deliveries_per_s\":%.1f,"
           "\"server_cpu_s\":%.3f,\"server_us_per_delivery\":%.3f,\"publisher_backlog_bytes\":%zu,\"pass\":%s,",
           step ? "," : "", step, rate, sent, send_s > 0 ? sent / send_s : 0, expected, step_delivered, lost,
           late_receipts, dropped, send_s > 0 ? step_delivered / send_s : 0, cpu,
           step_delivered ? 1e6 * cpu / step_delivered : 0, max_backlog, pass ? "true" : "false");
    lat_json("latency_ms", &step_lat);
    printf("}");
}

/* Publishes at `rate` for `duration` s to channels drawn uniformly, round-robin over the publishers. */
static void s5_offer(conn_t *pubs, double rate, double duration, int step, long *sent, long *expected,
                     size_t *max_backlog) {
    double t0 = now_s(), next = t0, t_end = t0 + duration, interval = 1.0 / rate;
    for (;;) {
        double t = now_s();
        if (t >= t_end) break;
        if (t >= next) {
            int ch = (int)(rng_unit() * o_nch);
            long seq = new_seq(ch, step);
            conn_t *pub = &pubs[*sent % o_pubs];
            if (pub->st == ST_OPEN) {
                rz_publish(pub, seq, ch, 0);
                *expected += members[ch];
            } else {
                seq_step[seq] = -3; /* publisher gone: not sent */
            }
            ++*sent;
            next += interval;
            if ((*sent & 63) == 0) {
                poll_once(0);
                for (int i = 0; i < o_pubs; i++)
                    if (backlog(&pubs[i]) > *max_backlog) *max_backlog = backlog(&pubs[i]);
            }
            continue;
        }
        int ms = (int)((next - t) * 1000);
        poll_once(ms > 0 ? ms : 0);
    }
}

static int rz_run_s5(void) {
    rz = 1;
    int total = o_subs + o_pubs;
    conns = calloc(total, sizeof(conn_t));
    nconns = total;
    if (o_big > o_subs) o_big = o_subs;
    assign_channels(o_subs);
    double cpu_setup0 = server_cpu_seconds();
    double t_setup = rz_open(0, o_subs, R_SUB);
    double cpu_setup = server_cpu_seconds() - cpu_setup0;
    if (failed_connects) {
        fprintf(stderr, "loadgen: %d connections failed\n", failed_connects);
        return 3;
    }
    for (int i = o_subs; i < total; i++) conns[i].nch = 0;
    rz_open(o_subs, o_pubs, R_PUB);
    long memberships = 0;
    int biggest = 0;
    for (int i = 0; i < o_nch; i++) {
        memberships += members[i];
        if (members[i] > biggest) biggest = members[i];
    }
    printf("{\"mode\":\"s5\",\"subs\":%d,\"channels\":%d,\"per\":%d,\"cap\":%d,\"big\":%d,\"pubs\":%d,"
           "\"memberships\":%ld,\"biggest_channel\":%d,\"mean_members\":%.2f,\"setup_s\":%.3f,"
           "\"setup_server_cpu_s\":%.3f,",
           o_subs, o_nch, o_per, o_cap, o_big, o_pubs, memberships, biggest, (double)memberships / o_nch, t_setup,
           cpu_setup);
    fprintf(stderr, "loadgen: s5 set-up %.1f s for %d connections, %ld memberships\n", t_setup, o_subs,
            memberships);
    conn_t *pubs = &conns[o_subs];
    /* S5-big: publications to the big channel, one at a time, before the ramp. */
    if (o_big && o_probes > 0) {
        lat_t per_recipient = {0}, first_ms = {0};
        long incomplete = 0;
        for (int i = 0; i < o_probes; i++) {
            probe_seq = new_seq(0, -1);
            probe_got = 0;
            long t_send = now_us();
            rz_publish(&pubs[0], probe_seq, 0, 0);
            double deadline = now_s() + 10;
            while (probe_got < members[0] && now_s() < deadline) poll_once(20);
            if (probe_got < members[0]) incomplete++;
            if (probe_got) {
                lat_add(&per_recipient, (double)(probe_last_us - t_send) / members[0]); /* us */
                lat_add(&first_ms, (probe_first_us - t_send) / 1000.0);
            }
            poll_until(now_s() + 0.05);
        }
        printf("\"big_probe\":{\"members\":%d,\"probes\":%d,\"incomplete\":%ld,", members[0], o_probes,
               incomplete);
        lat_json("fanout_us_per_recipient", &per_recipient);
        printf(",");
        lat_json("first_receipt_ms", &first_ms);
        printf("},");
    }
    if (o_idle > 0) { /* everyone subscribed, a trickle of publications: the server's standing cost */
        cur_step = -5;
        step_delivered = 0;
        long sent = 0, expected = 0;
        size_t ignored = 0;
        double cpu0 = server_cpu_seconds(), t0 = now_s();
        s5_offer(pubs, o_idle_rate, o_idle, -5, &sent, &expected, &ignored);
        double elapsed = now_s() - t0, cpu = server_cpu_seconds() - cpu0;
        double drain_end = now_s() + o_drain;
        while (step_delivered < expected && now_s() < drain_end) poll_once(20);
        printf("\"idle\":{\"seconds\":%.3f,\"rate\":%.1f,\"sent\":%ld,\"expected\":%ld,\"delivered\":%ld,"
               "\"server_cpu_s\":%.3f,\"server_cpu_pct\":%.2f},",
               elapsed, o_idle_rate, sent, expected, step_delivered, cpu, 100 * cpu / elapsed);
        cur_step = -100;
    }
    if (o_warmup > 0) { /* not reported: JIT compilers, allocators and caches warm up */
        const char *first = o_rates;
        double rate = strtod(first, NULL);
        cur_step = -4;
        long sent = 0, expected = 0;
        size_t ignored = 0;
        s5_offer(pubs, rate > 0 ? rate : 25, o_warmup, -4, &sent, &expected, &ignored);
        double drain_end = now_s() + o_drain;
        while (step_delivered < expected && now_s() < drain_end) poll_once(20);
        cur_step = -100;
        poll_until(now_s() + 0.5);
    }
    printf("\"steps\":[");
    int step = 0, failing = 0;
    const char *r = o_rates;
    while (*r) {
        double rate = strtod(r, (char **)&r);
        if (*r == ',') r++;
        if (rate <= 0) continue;
        cur_step = step;
        step_delivered = 0;
        late_receipts = 0;
        step_lat.n = 0;
        t_step_last_recv = 0;
        long dropped0 = closed_open, expected = 0, sent = 0;
        size_t max_backlog = 0;
        double cpu0 = server_cpu_seconds();
        double t0 = now_s();
        s5_offer(pubs, rate, o_step, step, &sent, &expected, &max_backlog);
        double send_s = now_s() - t0;
        double drain_end = now_s() + o_drain;
        while (step_delivered < expected && now_s() < drain_end) poll_once(20);
        double cpu = server_cpu_seconds() - cpu0;
        qsort(step_lat.v, step_lat.n, sizeof(double), cmp_double);
        long dropped = closed_open - dropped0;
        int pass = step_delivered >= expected && dropped == 0 && lat_pct(&step_lat, 99) <= o_p99;
        s5_step_json(step, rate, sent, send_s, expected, cpu, pass, max_backlog, dropped);
        fflush(stdout);
        fprintf(stderr, "loadgen: step %d: %.0f pubs/s, %ld/%ld delivered, p99 %.1f ms, %s\n", step, rate,
                step_delivered, expected, lat_pct(&step_lat, 99), pass ? "pass" : "FAIL");
        step++;
        failing = pass ? 0 : failing + 1;
        if (failing >= o_stop_fail) break;
        /* Quiet gap so that the next step starts from an idle server. */
        cur_step = -100;
        poll_until(now_s() + 0.5);
    }
    printf("],\"stray_receipts\":%ld,\"publish_errors\":%ld,\"dropped_connections\":%ld}\n", stray_receipts,
           publish_errors, closed_open);
    return 0;
}

/* ------------------------------------------------------------------ s8: publish through the protocol */
/* `rooms` publishers, each publishing to its own room of `room_size` subscribers,
 * one publication in flight each (publish, wait for the ack, publish again) for
 * `duration` s.  Then one publisher offered `over_factor` x the acks/s just
 * measured (or `over_rate`) for `over_duration` s, reading every reply. */
static double s8_deadline;
static long s8_sent;
static int s8_closed_loop;
static int s8_room_offset; /* o_rooms while publishing to channels nobody joined */

static void s8_next(conn_t *c) {
    if (!s8_closed_loop || now_s() >= s8_deadline || c->st != ST_OPEN) return;
    int room = c->idx - o_rooms * o_room_size + s8_room_offset;
    long seq = new_seq(room, s8_room_offset ? -6 : -2);
    c->sent_at_us = now_us();
    rz_publish(c, seq, room, 1);
    s8_sent++;
}

static void s8_on_ack(conn_t *c, long seq, int refused) {
    (void)seq;
    if (refused) refusals++;
    else acks++;
    if (s8_closed_loop) {
        lat_add(&ack_lat, (now_us() - c->sent_at_us) / 1000.0);
        s8_next(c);
    }
}

static long undelivered_acked(long from, long to, long *partly) {
    long missing = 0, part = 0;
    for (long s = from; s < to; s++) {
        if (seq_acked[s] != 1) continue;
        if (seq_got[s] < o_room_size) {
            missing += o_room_size - seq_got[s];
            part++;
        }
    }
    *partly = part;
    return missing;
}

static int rz_run_s8(void) {
    rz = 1;
    int nsubs = o_rooms * o_room_size, total = nsubs + o_rooms;
    conns = calloc(total, sizeof(conn_t));
    nconns = total;
    o_nch = o_rooms;
    members = calloc(o_rooms, sizeof(int));
    for (int i = 0; i < nsubs; i++) {
        conns[i].nch = 1;
        conns[i].ch[0] = i / o_room_size;
        members[i / o_room_size]++;
    }
    double t_setup = rz_open(0, nsubs, R_SUB);
    rz_open(nsubs, o_rooms, R_PUB);
    if (failed_connects) {
        fprintf(stderr, "loadgen: %d connections failed\n", failed_connects);
        return 3;
    }
    on_ack_hook = s8_on_ack;
    printf("{\"mode\":\"s8\",\"rooms\":%d,\"room_size\":%d,\"setup_s\":%.3f,", o_rooms, o_room_size, t_setup);
    if (o_empty > 0) {
        /* Phase 0: the same closed loop to channels nobody joined: what a publish command
         * itself costs (history on, reply sent), with no fan-out. */
        s8_room_offset = o_rooms;
        s8_closed_loop = 1;
        double cpu_e = server_cpu_seconds(), t_e = now_s();
        s8_deadline = t_e + o_empty;
        for (int i = nsubs; i < total; i++) s8_next(&conns[i]);
        poll_until(s8_deadline);
        double run_e = now_s() - t_e;
        long acks_e = acks;
        double end_e = now_s() + o_drain;
        while (acks + refusals < s8_sent && now_s() < end_e) poll_once(20);
        s8_closed_loop = 0;
        double cpu = server_cpu_seconds() - cpu_e;
        printf("\"empty_channels\":{\"duration_s\":%.3f,\"publications\":%ld,\"acked\":%ld,\"refused\":%ld,"
               "\"round_trips_per_s\":%.1f,\"server_cpu_s\":%.3f,\"server_us_per_publication\":%.2f,",
               run_e, s8_sent, acks, refusals, acks_e / run_e, cpu, s8_sent ? 1e6 * cpu / s8_sent : 0);
        lat_json("round_trip_ms", &ack_lat);
        printf("},");
        fprintf(stderr, "loadgen: s8 empty channels: %.0f round trips/s, %.1f us per publication\n", acks_e / run_e,
                s8_sent ? 1e6 * cpu / s8_sent : 0);
        s8_room_offset = 0;
        acks = refusals = s8_sent = 0;
        ack_lat.n = 0;
        poll_until(now_s() + 0.5);
    }
    /* Phase 1: closed loop. */
    long first1 = nseq;
    cur_step = -2;
    s8_closed_loop = 1;
    double cpu0 = server_cpu_seconds(), t0 = now_s();
    s8_deadline = t0 + o_duration;
    for (int i = nsubs; i < total; i++) s8_next(&conns[i]);
    poll_until(s8_deadline);
    double run_s = now_s() - t0;
    long acks_in_run = acks;
    double drain_end = now_s() + o_drain;
    while (acks + refusals < s8_sent && now_s() < drain_end) poll_once(20);
    s8_closed_loop = 0;
    long expected = 0, delivered = 0;
    drain_end = now_s() + o_drain;
    for (;;) {
        expected = 0;
        delivered = 0;
        for (long s = first1; s < nseq; s++) {
            expected += o_room_size;
            delivered += seq_got[s];
        }
        if (delivered >= expected || now_s() >= drain_end) break;
        poll_once(20);
    }
    double cpu = server_cpu_seconds() - cpu0;
    double capacity = acks_in_run / run_s;
    printf("\"closed_loop\":{\"duration_s\":%.3f,"
           "\"publications\":%ld,\"acked\":%ld,\"refused\":%ld,\"round_trips_per_s\":%.1f,\"expected\":%ld,"
           "\"delivered\":%ld,\"lost\":%ld,\"deliveries_per_s\":%.1f,\"server_cpu_s\":%.3f,"
           "\"server_us_per_publication\":%.2f,\"dropped_connections\":%ld,",
           run_s, s8_sent, acks, refusals, capacity, expected, delivered,
           expected - delivered, delivered / run_s, cpu, s8_sent ? 1e6 * cpu / s8_sent : 0, closed_open);
    lat_json("round_trip_ms", &ack_lat);
    printf(",");
    lat_json("delivery_latency_ms", &step_lat);
    printf("},");
    step_lat.n = 0;
    fflush(stdout);
    fprintf(stderr, "loadgen: s8 closed loop: %.0f round trips/s, %ld/%ld delivered\n", capacity, delivered,
            expected);
    /* Phase 2: one publisher over capacity. */
    poll_until(now_s() + 0.5);
    double rate = o_over_rate > 0 ? o_over_rate : o_over_factor * capacity;
    if (rate < 1) rate = 1;
    conn_t *pub = &conns[nsubs];
    long first = nseq, sent = 0;
    long acks0 = acks, refusals0 = refusals, dropped0 = closed_open;
    size_t max_backlog = 0;
    cpu0 = server_cpu_seconds();
    t0 = now_s();
    double next = t0, t_end = t0 + o_over_duration, interval = 1.0 / rate;
    while (now_s() < t_end && pub->st == ST_OPEN) {
        double t = now_s();
        if (t >= next) {
            int room = (int)(sent % o_rooms);
            long seq = new_seq(room, -2);
            rz_publish(pub, seq, room, 1);
            sent++;
            next += interval;
            if ((sent & 63) == 0) {
                poll_once(0);
                if (backlog(pub) > max_backlog) max_backlog = backlog(pub);
            }
            continue;
        }
        int ms = (int)((next - t) * 1000);
        poll_once(ms > 0 ? ms : 0);
    }
    double offer_s = now_s() - t0;
    /* Everything offered is answered at the server's pace: wait for it. */
    double ack_deadline = now_s() + o_drain + 3 * o_over_duration;
    double t_last_ack = now_s();
    long seen = 0;
    while (pub->st == ST_OPEN && now_s() < ack_deadline) {
        long answered = acks - acks0 + refusals - refusals0;
        if (answered != seen) {
            seen = answered;
            t_last_ack = now_s();
        }
        if (answered >= sent) break;
        poll_once(20);
    }
    drain_end = now_s() + o_drain;
    long partly = 0, missing = 0;
    for (;;) {
        missing = undelivered_acked(first, nseq, &partly);
        if (!missing || now_s() >= drain_end) break;
        poll_once(20);
    }
    cpu = server_cpu_seconds() - cpu0;
    long acked = acks - acks0, refused = refusals - refusals0, got = 0;
    for (long s = first; s < nseq; s++) got += seq_got[s];
    int closed = pub->st == ST_CLOSED;
    printf("\"over_capacity\":{\"offered_rate\":%.1f,\"offer_s\":%.3f,\"offered\":%ld,\"acked\":%ld,\"refused\":%ld,"
           "\"unanswered\":%ld,\"acked_per_s\":%.1f,\"publisher_closed\":%s,\"close_code\":%d,"
           "\"acked_not_delivered\":%ld,\"acked_publications_incomplete\":%ld,\"delivered\":%ld,"
           "\"max_publisher_backlog_bytes\":%zu,\"server_cpu_s\":%.3f,\"dropped_connections\":%ld",
           rate, offer_s, sent, acked, refused, sent - acked - refused,
           t_last_ack > t0 ? acked / (t_last_ack - t0) : 0, closed ? "true" : "false", pub->close_code, missing,
           partly, got, max_backlog, cpu, closed_open - dropped0);
    printf(",");
    lat_json("delivery_latency_ms", &step_lat);
    printf("},\"stray_receipts\":%ld}\n", stray_receipts);
    fprintf(stderr, "loadgen: s8 over capacity: offered %ld at %.0f/s, acked %ld, closed %d, missing %ld\n", sent,
            rate, acked, closed, missing);
    return 0;
}

/* ------------------------------------------------------------------ storm: connect storm */
/* `conns` connections, `concurrency` in flight, each until it is subscribed to one
 * channel (prefix + idx % channels; raw: until the 101).  Prints READY with the
 * rate and time-to-subscribed percentiles, then holds the connections (answering
 * pings) until a line arrives on stdin, so the runner can read the server's memory. */
static int rz_run_storm(void) {
    rz = 1;
    storm_mode = 1;
    load_tokens();
    conns = calloc(o_conns, sizeof(conn_t));
    nconns = o_conns;
    for (long i = 0; i < o_conns; i++) {
        conns[i].nch = (herald_proto || sio_proto) && o_nch > 0 ? 1 : 0;
        conns[i].ch[0] = (int)(i % (o_nch > 0 ? o_nch : 1));
    }
    double cpu0 = server_cpu_seconds();
    double t0 = now_s();
    /* like rz_open, but failures are counted, not fatal */
    long opened = 0;
    while (opened < o_conns || pending_handshakes > 0) {
        while (opened < o_conns && pending_handshakes < o_concurrency) {
            conn_t *c = &conns[opened];
            int nch = c->nch, ch0 = c->ch[0];
            open_conn(c, (int)opened, R_IDLE, 0);
            c->nch = nch;
            c->ch[0] = ch0;
            opened++;
        }
        poll_once(50);
        if (now_s() - t0 > o_timeout) break;
    }
    double t = now_s() - t0;
    double cpu = server_cpu_seconds() - cpu0;
    printf("READY {\"mode\":\"storm\",\"conns\":%ld,\"concurrency\":%d,\"established\":%d,\"failed\":%d,"
           "\"unfinished\":%d,\"connect_s\":%.3f,\"connects_per_s\":%.1f,\"server_cpu_s\":%.3f,"
           "\"server_us_per_connection\":%.1f,\"tokens\":%ld,",
           o_conns, o_concurrency, established, failed_connects, pending_handshakes, t, established / t, cpu,
           established ? 1e6 * cpu / established : 0, ntokens);
    lat_json("time_to_ready_ms", &ready_lat);
    printf("}\n");
    fflush(stdout);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0xffffffff};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    double deadline = now_s() + 600;
    while (now_s() < deadline) {
        struct epoll_event evs[512];
        int n = epoll_wait(ep, evs, 512, 1000);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u32 == 0xffffffff) return 0;
            on_event(&conns[evs[i].data.u32], evs[i].events);
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen fanout|rate|echo|idle key=value...\n");
        return 2;
    }
    const char *mode = argv[1];
    for (int i = 2; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) {
            fprintf(stderr, "loadgen: expected key=value, got %s\n", argv[i]);
            return 2;
        }
        *eq = 0;
        const char *k = argv[i], *v = eq + 1;
        if (!strcmp(k, "host")) o_host = v;
        else if (!strcmp(k, "port")) o_port = atoi(v);
        else if (!strcmp(k, "path")) o_path = v;
        else if (!strcmp(k, "proto")) o_proto = v;
        else if (!strcmp(k, "channel")) o_channel = v;
        else if (!strcmp(k, "size")) o_size = atoi(v);
        else if (!strcmp(k, "subs")) o_subs = atoi(v);
        else if (!strcmp(k, "msgs")) o_msgs = atol(v);
        else if (!strcmp(k, "inflight")) o_inflight = atoi(v);
        else if (!strcmp(k, "rate")) o_rate = atof(v);
        else if (!strcmp(k, "duration")) o_duration = atof(v);
        else if (!strcmp(k, "slow")) o_slow = atoi(v);
        else if (!strcmp(k, "clients")) o_clients = atoi(v);
        else if (!strcmp(k, "rounds")) o_rounds = atol(v);
        else if (!strcmp(k, "conns")) o_conns = atol(v);
        else if (!strcmp(k, "timeout")) o_timeout = atof(v);
        else if (!strcmp(k, "concurrency")) o_concurrency = atoi(v);
        else if (!strcmp(k, "port2")) o_port2 = atoi(v);
        else if (!strcmp(k, "ports") || !strcmp(k, "srcs")) {
            int is_ports = k[0] == 'p';
            char *list = strdup(v), *save = NULL;
            for (char *item = strtok_r(list, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
                int *n = is_ports ? &o_nports : &o_nsrcs;
                if (*n == MAX_LIST) {
                    fprintf(stderr, "loadgen: at most %d entries in %s\n", MAX_LIST, k);
                    return 2;
                }
                if (is_ports) o_ports[o_nports++] = atoi(item);
                else if (inet_pton(AF_INET, item, &o_srcs[o_nsrcs++]) != 1) {
                    fprintf(stderr, "loadgen: srcs: not an IPv4 address: %s\n", item);
                    return 2;
                }
            }
            free(list);
        }
        else if (rz_option(k, v)) continue;
        else {
            fprintf(stderr, "loadgen: unknown key %s\n", k);
            return 2;
        }
    }
    if (o_size > 65000) o_size = 65000;
    herald_proto = !strcmp(o_proto, "herald");
    sio_proto = !strcmp(o_proto, "sio");
    padding = malloc(o_size + 1);
    memset(padding, 'x', o_size);
    ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    if (!strcmp(mode, "fanout")) return run_pubsub(0);
    if (!strcmp(mode, "rate")) return run_pubsub(1);
    if (!strcmp(mode, "echo")) return run_echo();
    if (!strcmp(mode, "idle")) return run_idle();
    if (!strcmp(mode, "s5")) return rz_run_s5();
    if (!strcmp(mode, "s8")) return rz_run_s8();
    if (!strcmp(mode, "storm")) return rz_run_storm();
    fprintf(stderr, "loadgen: unknown mode %s\n", mode);
    return 2;
}
