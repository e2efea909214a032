/* A vhost-user net backend that does nothing: the floor under bench_qemu.py's ratios.
 *
 *   null_backend SOCKET_PATH FEATURES_HEX PROTOCOL_FEATURES_HEX
 *
 * It accepts one frontend, answers every request the way a backend must (the inherent
 * replies, REPLY_ACK acks, the LOG_SHMFD reply to SET_LOG_BASE) and closes every fd it is
 * sent, without touching the kernel or guest memory. QEMU cannot tell it from a working
 * backend until a packet should flow, so the time QEMU spends inside a DRIVER_OK write
 * against it is QEMU's own vhost-user cost plus the least any backend must add: one
 * wakeup, one read and one reply. Written in C so that this floor is not Python's.
 * bench_qemu.py --floor builds it with the system compiler; it is a measuring instrument,
 * not part of kvhost.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

enum {
    GET_FEATURES = 1, SET_LOG_BASE = 6, SET_VRING_BASE = 10, GET_VRING_BASE = 11,
    GET_PROTOCOL_FEATURES = 15, SET_PROTOCOL_FEATURES = 16, GET_QUEUE_NUM = 17,
    GET_MAX_MEM_SLOTS = 36,
};
#define FLAG_VERSION 0x1u
#define FLAG_REPLY 0x4u
#define FLAG_NEED_REPLY 0x8u
#define PROTOCOL_F_LOG_SHMFD 1u
#define PROTOCOL_F_REPLY_ACK 3u
#define HEADER 12u
#define MAX_FDS 8

static uint64_t features, offered_protocol, protocol;
static uint32_t bases[256];

static int send_reply(int fd, uint32_t request, const void *payload, uint32_t size)
{
    unsigned char out[HEADER + 16];
    uint32_t hdr[3] = {request, FLAG_VERSION | FLAG_REPLY, size};
    memcpy(out, hdr, HEADER);
    memcpy(out + HEADER, payload, size);
    return send(fd, out, HEADER + size, MSG_NOSIGNAL) == (ssize_t)(HEADER + size) ? 0 : -1;
}

static int send_u64(int fd, uint32_t request, uint64_t value)
{
    return send_reply(fd, request, &value, sizeof value);
}

/* One complete message: answer it if the protocol says the frontend waits for an answer. */
static int handle(int fd, uint32_t request, uint32_t flags, const unsigned char *p, uint32_t size)
{
    uint32_t state[2] = {0, 0};
    uint64_t u64 = 0;
    if (size >= 8)
        memcpy(&u64, p, 8);
    if (size >= 8)
        memcpy(state, p, 8);
    switch (request) {
    case GET_FEATURES:
        return send_u64(fd, request, features);
    case GET_PROTOCOL_FEATURES:
        return send_u64(fd, request, offered_protocol);
    case SET_PROTOCOL_FEATURES:
        protocol = u64;
        break;
    case GET_QUEUE_NUM:
        return send_u64(fd, request, 1);
    case GET_MAX_MEM_SLOTS:
        return send_u64(fd, request, 8);
    case SET_VRING_BASE:
        bases[state[0] & 0xff] = state[1];
        break;
    case GET_VRING_BASE:
        state[1] = bases[state[0] & 0xff];
        return send_reply(fd, request, state, sizeof state);
    case SET_LOG_BASE:
        if (protocol & (1u << PROTOCOL_F_LOG_SHMFD))
            return send_u64(fd, request, 0);
        break;
    }
    if ((flags & FLAG_NEED_REPLY) && (protocol & (1u << PROTOCOL_F_REPLY_ACK)))
        return send_u64(fd, request, 0);
    return 0;
}

static void close_fds(struct msghdr *msg)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int fds[MAX_FDS];
        memcpy(fds, CMSG_DATA(c), (size_t)n * sizeof(int));
        for (int i = 0; i < n; i++)
            close(fds[i]);
    }
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKET_PATH FEATURES_HEX PROTOCOL_FEATURES_HEX\n", argv[0]);
        return 2;
    }
    features = strtoull(argv[2], NULL, 16);
    offered_protocol = strtoull(argv[3], NULL, 16);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (lfd < 0 || strlen(argv[1]) >= sizeof addr.sun_path) {
        fprintf(stderr, "null_backend: bad socket path %s\n", argv[1]);
        return 1;
    }
    strcpy(addr.sun_path, argv[1]);
    unlink(argv[1]);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 1)) {
        fprintf(stderr, "null_backend: cannot listen on %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    fprintf(stderr, "null_backend: listening on %s\n", argv[1]);
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        return 1;
    static unsigned char buf[1 << 17];
    size_t have = 0;
    for (;;) {
        char control[CMSG_SPACE(MAX_FDS * sizeof(int))];
        struct iovec iov = {buf + have, sizeof buf - have};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
        ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
        if (n <= 0)
            return n == 0 ? 0 : 1;
        close_fds(&msg);
        have += (size_t)n;
        size_t off = 0;
        while (have - off >= HEADER) {
            uint32_t hdr[3];
            memcpy(hdr, buf + off, HEADER);
            if (hdr[2] > sizeof buf - HEADER) {
                fprintf(stderr, "null_backend: message of %u bytes\n", hdr[2]);
                return 1;
            }
            if (have - off < HEADER + hdr[2])
                break;
            if (handle(fd, hdr[0], hdr[1], buf + off + HEADER, hdr[2]))
                return 1;
            off += HEADER + hdr[2];
        }
        memmove(buf, buf + off, have - off);
        have -= off;
    }
}
