"""A listening socket that records every connection a sandboxed program manages to make."""

from __future__ import annotations

import socket
import threading


def recording_listener(fam: int, addr) -> tuple[socket.socket, list[bytes], threading.Event]:
    """Listen on ``addr`` (TCP or Unix, abstract included) in a thread; each accepted connection
    appends its first bytes (or ``b"<connected>"``) to the returned list until the event is set."""
    srv = socket.socket(fam)
    srv.bind(addr)
    srv.listen(8)
    srv.settimeout(0.1)
    got: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            got.append(c.recv(100) or b"<connected>")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, got, stop
