"""Bytes on the wire, counted by nestvirt itself: a TCP relay between the source and the
destination that forwards every connection (the main stream and each multifd channel) and
counts what it moved, independent of QEMU's own counters (7.2 counts multifd bytes before
compression)."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from dataclasses import dataclass, field

# splice() moves the bytes through a kernel pipe without copying them into Python: the relay
# costs a few syscalls per MiB instead of a core's worth of memcpy (measured in ci/bench_overhead.py).
_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, spelt out: Python names it only from 3.10 on some builds


@dataclass
class WireCount:
    """What one relay moved: bytes each way, connections, and its own CPU time."""

    to_dst: int = 0
    to_src: int = 0
    connections: int = 0
    cpu_s: float = 0.0
    per_connection: list[int] = field(default_factory=list)  # bytes to dst, in accept order

    def to_json(self) -> dict:
        return {"to_dst": self.to_dst, "to_src": self.to_src, "connections": self.connections,
                "cpu_s": round(self.cpu_s, 4), "per_connection": list(self.per_connection)}


class CountingRelay:
    """Listens on 127.0.0.1:``port`` (0: the kernel picks) and forwards each connection to
    ``target``; ``count()`` is exact once every connection has closed. Use as a context
    manager or call close(); every thread it starts is joined (bounded) there."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", port))
        self._lsock.listen(64)
        self.port = self._lsock.getsockname()[1]
        self._lock = threading.Lock()
        self._count = WireCount()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._closing = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="nestvirt-relay", daemon=True)
        self._acceptor.start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                a, _ = self._lsock.accept()
            except OSError:
                return  # closed
            try:
                b = socket.create_connection(self.target, timeout=10)
                b.settimeout(None)
            except OSError:
                a.close()
                continue
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                idx = self._count.connections
                self._count.connections += 1
                self._count.per_connection.append(0)
                self._socks += [a, b]
            for src, dst, way in ((a, b, "to_dst"), (b, a, "to_src")):
                t = threading.Thread(target=self._pump, args=(src, dst, way, idx),
                                     name=f"nestvirt-relay-{idx}-{way}", daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str, idx: int) -> None:
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, _CHUNK)  # fewer, larger splices
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the 64 KiB default still works
        t0 = time.thread_time()
        try:
            while True:
                try:
                    n = os.splice(src.fileno(), w, _CHUNK)
                except OSError:
                    n = 0
                if n == 0:
                    break
                left = n
                while left:
                    left -= os.splice(r, dst.fileno(), left)
                with self._lock:
                    setattr(self._count, way, getattr(self._count, way) + n)
                    if way == "to_dst":
                        self._count.per_connection[idx] += n
        except OSError:
            pass  # the peer went away mid-stream: what was moved is counted
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)  # pass the EOF on, as a direct connection would
            except OSError:
                pass
            os.close(r)
            os.close(w)
            with self._lock:
                self._count.cpu_s += time.thread_time() - t0

    def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until every forwarded connection has closed; True if they did."""
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def count(self) -> WireCount:
        with self._lock:
            c = self._count
            return WireCount(c.to_dst, c.to_src, c.connections, c.cpu_s, list(c.per_connection))

    def close(self, timeout: float = 5.0) -> WireCount:
        """Stop accepting, end every connection still open, join the threads; the final count."""
        self._closing.set()
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lsock.close()
        self._acceptor.join(timeout)
        if not self.wait_idle(min(timeout, 1.0)):
            with self._lock:
                socks = list(self._socks)
            for s in socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.wait_idle(timeout)
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()
        return self.count()
