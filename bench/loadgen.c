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
 * Keys: host port path proto=raw|herald channel size subs msgs inflight rate
 *       duration slow clients rounds conns timeout
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
} conn_t;

/* ------------------------------------------------------------------ options */
static const char *o_host = "127.0.0.1", *o_path = "/ws_broadcast", *o_proto = "raw", *o_channel = "bench";
static int o_port = 8000, o_size = 100, o_subs = 1000, o_inflight = 10, o_slow = 0, o_clients = 50;
static long o_msgs = 200, o_rounds = 2000, o_conns = 5000;
static double o_rate = 50, o_duration = 10, o_timeout = 30;
static int herald_proto = 0;

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

/* A whole text frame arrived on c. */
static void on_text(conn_t *c, const char *p, size_t len) {
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
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket (raise ulimit -n)");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (slow) {
        int small = 4096; /* so the server's buffers fill quickly */
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(o_port)};
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
        while (opened < count && pending_handshakes < 128) {
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
        else {
            fprintf(stderr, "loadgen: unknown key %s\n", k);
            return 2;
        }
    }
    if (o_size > 65000) o_size = 65000;
    herald_proto = !strcmp(o_proto, "herald");
    padding = malloc(o_size + 1);
    memset(padding, 'x', o_size);
    ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    if (!strcmp(mode, "fanout")) return run_pubsub(0);
    if (!strcmp(mode, "rate")) return run_pubsub(1);
    if (!strcmp(mode, "echo")) return run_echo();
    if (!strcmp(mode, "idle")) return run_idle();
    fprintf(stderr, "loadgen: unknown mode %s\n", mode);
    return 2;
}
