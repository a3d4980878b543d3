#!/usr/bin/env python3
"""Groups a perf profile of keyward by component: the share of samples of each.

Reads `perf script -F comm,tid,ip,sym,dso` (a profile recorded with call graphs) on
stdin. A user-space sample belongs to the first rule its stack matches from the leaf
up, so an allocation, a copy or a hash counts as that wherever it is called from. A
kernel sample is named by the first keyward frame under the system call (which socket:
the client's through hyper, Redis's through the redis crate, or the runtime's epoll)
and by the system call itself. With the measured CPU per admission in µs as argument,
each share is also printed in µs. BENCHMARKS.md, "Where the sidecar's CPU goes".

    perf script -i perf.data -F comm,tid,ip,sym,dso | python3 scripts/perf-components.py 18.7
"""
import collections
import re
import sys

# (component, symbol pattern), in priority order.
USER = [
    ("allocation (mimalloc)", r"^(_?mi_|malloc|free|realloc|calloc|__rust_alloc|__rust_dealloc|__rust_realloc|__rdl_)"),
    ("memcpy/memmove", r"(memcpy|memmove|memset)"),
    ("metrics (prometheus)", r"(prometheus::|keyward::metrics::)"),
    ("tracing", r"(^tracing|tracing_subscriber|tracing_core)"),
    ("key lookup (SHA-256, cache)", r"(sha2::|lookup_hash|client_keys::cache|keyward::cache::|dashmap|spend_now::remember|check_key)"),
    ("lease id and signing (HMAC)", r"(hmac::|sign_lease|SignedLease::encode|LeaseId::new|rand::|chacha|hex::)"),
    ("JSON request parse", r"(serde_json::de|JsonBody|AdmitBody|serde::de|::deserialize)"),
    ("JSON answer and rate-limit headers", r"(serde_json::ser|admitted_response|admitted_body|ratelimit::|to_rfc3339|chrono::|serde::ser)"),
    ("script arguments (Call, key names)", r"(scripts::call|AdmitWindowArgs|AdmitWindowKeys|KeySpace|ToRedisArgs|admit_redis|limit_arg|script_clock|Cmd::arg|Cmd::with_capacity|evalsha)"),
    ("redis crate (encode, parse, multiplexer)", r"(^redis::|<redis::|combine::|FromRedisValue|AdmitReply)"),
    ("hyper (HTTP parse and write, header map)", r"(hyper::|httparse|^http::|<http::)"),
    ("axum/tower routing", r"(axum::|tower::|matchit|hyper_util)"),
    ("keyward's admission (the rest of its code)", r"keyward::"),
    ("tokio runtime", r"(tokio::|mio::|futures_util)"),
]
USER = [(name, re.compile(p)) for name, p in USER]
SOCKETS = [
    ("Redis socket", re.compile(r"(redis::|combine::|tokio_util::codec)")),
    ("client socket", re.compile(r"(hyper::|hyper_util)")),
    ("runtime (epoll)", re.compile(r"(mio::|tokio::runtime)")),
]
SYSCALLS = [("writev", "send"), ("sendto", "send"), ("sys_write", "send"),
            ("recvfrom", "recv"), ("sys_read", "recv"), ("epoll_wait", "epoll_wait")]


def syscall(frames):
    kernel = " ".join(sym for sym, dso in frames if "kernel" in dso)
    # A sample in the scheduler on the way out of a system call: the task was switched
    # out (its send woke the peer) and is back.
    if "schedule" in kernel and "exit_to_user_mode" in kernel:
        return "switched out and back"
    return next((name for pattern, name in SYSCALLS if pattern in kernel), "other")


def classify(frames):
    if "kernel" in frames[0][1]:
        for sym, dso in frames:
            if "kernel" in dso or "libc" in dso or sym == "[unknown]":
                continue
            for name, pattern in SOCKETS:
                if pattern.search(sym):
                    return f"kernel: {name}, {syscall(frames)}"
        return f"kernel: other, {syscall(frames)}"
    for sym, _ in frames:
        for name, pattern in USER:
            if pattern.search(sym):
                return name
    return "libc and other"


def main():
    counts = collections.Counter()
    frames = []
    for line in list(sys.stdin) + [""]:
        m = re.match(r"\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$", line)
        if m and line[:1] in "\t ":
            frames.append((re.sub(r"\+0x[0-9a-f]+$", "", m.group(1)), m.group(2)))
        elif frames:
            counts[classify(frames)] += 1
            frames = []
    total = sum(counts.values())
    us = float(sys.argv[1]) if len(sys.argv) > 1 else None
    for name, n in counts.most_common():
        extra = f"  {us * n / total:6.2f} µs" if us else ""
        print(f"{100 * n / total:6.1f}%{extra}  {name}")
    print(f"{total} samples")


main()
