"""A TCP proxy that counts round trips on the wire, for tests that bound how often a client waits.

Every chunk read from either side is recorded (in order, per connection) before it is passed on. A
round trip is a chunk from the client that follows a chunk from the server, or that opens the window
counted: the client sent, then waited for an answer.  What a driver pipelines counts once.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class WireTrips:
    """A proxy on 127.0.0.1 to (host, port); `trips(since)` counts round trips after `mark()`."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.events: list[tuple[int, str]] = []  # (connection number, "c" | "s")
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def mark(self) -> int:
        """Where a window to count starts."""
        with self.lock:
            return len(self.events)

    def trips(self, since: int) -> int:
        """Round trips on every connection since `since` (a `mark()`)."""
        with self.lock:
            window = self.events[since:]
        last: dict[int, str] = {}
        trips = 0
        for conn, side in window:
            trips += side == "c" and last.get(conn, "s") == "s"
            last[conn] = side
        return trips

    def stop(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        n = 0
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            n += 1
            for src, dst, side in ((client, server, "c"), (server, client, "s")):
                threading.Thread(target=self._pump, args=(src, dst, n, side), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, conn: int, side: str) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                with self.lock:  # recorded before it is passed on: the answer cannot overtake it
                    self.events.append((conn, side))
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
