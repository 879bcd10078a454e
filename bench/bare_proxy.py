"""The floor under the balancer's own cost (issue 20): a proxy in Python and gevent that makes
the same system calls as llmlb's fast path for one proxied request (one receive from the
client, one send to the upstream over a kept-alive connection, one receive of its answer, one
send back) and does nothing else: no key, no routing, no metrics, no history, no access line,
no header checks. What it costs a request is what Python and gevent cost on this machine; the
rest of llmlb's CPU per request is llmlb's own work.

    .venv/bin/python bench/bare_proxy.py PORT UPSTREAM_PORT

It understands just enough HTTP/1.1 for ``wrk`` and nginx (a ``Content-Length`` on every
message); ``bench/balancer.py``'s ``proxy`` part runs it pinned to the proxy's core.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402 - after gevent's patch
import sys  # noqa: E402

from gevent.server import StreamServer  # noqa: E402


def read_message(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(head, body, what was read past it), or None when the peer closed."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            return None
        rest += data
    return head, rest[:length], rest[length:]


def main() -> None:
    port, upstream = int(sys.argv[1]), ("127.0.0.1", int(sys.argv[2]))

    def handle(client: socket.socket, _address: object) -> None:
        up = socket.create_connection(upstream)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                request = read_message(client, buf)
                if request is None:
                    return
                head, body, buf = request
                path = head.split(b" ", 2)[1]
                up.send(b"POST %s HTTP/1.1\r\nHost: upstream\r\nContent-Type: application/json"
                        b"\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body))
                answer = read_message(up, b"")
                if answer is None:
                    return
                status = answer[0].split(b"\r\n", 1)[0].split(b" ", 1)[1]
                client.send(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (status, len(answer[1]), answer[1]))
        finally:
            up.close()
            client.close()

    StreamServer(("127.0.0.1", port), handle, backlog=1024).serve_forever()


if __name__ == "__main__":
    main()
