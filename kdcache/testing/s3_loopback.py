"""A real S3 endpoint on the loopback interface, for tests and ``kdcache bench``: moto's threaded
server in a child process, spoken to over HTTP like any object store (nothing is mocked inside the
process that uses it). The child keeps its buckets while its HTTP server is stopped and started
again, which is how a network failure in the middle of a dump is staged.

    with LoopbackS3() as s3:
        s3.make_bucket("logits")
        env = s3.env          # AWS_ENDPOINT_URL, credentials and region for child processes
        s3.pause(); s3.resume()

Needs ``moto[server]`` (the ``test`` extra) and ``s3fs`` (the ``s3`` extra).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import IO, Any, cast

from kdcache.errors import KdcacheError

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kdcache", "AWS_SECRET_ACCESS_KEY": "kdcache", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackS3:
    """moto's S3 on ``http://127.0.0.1:PORT`` in a child process; see the module docstring."""

    def __init__(self, port: int | None = None, auth: bool = False) -> None:
        """``auth``: check every request's credentials against moto's IAM (none exist: every key is
        refused), to stage wrong credentials."""
        try:
            import moto  # noqa: F401
        except ImportError:
            raise KdcacheError("a loopback S3 endpoint needs moto: pip install 'moto[server]'") from None
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "kdcache.testing.s3_loopback", str(self.port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **CREDENTIALS,
                                          **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if auth else {})})
        self._in, self._out = cast(IO[str], self.proc.stdin), cast(IO[str], self.proc.stdout)  # PIPE: never None
        self._expect("started", "start")

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3/s3fs (and so kdcache) at this endpoint."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.url}

    def _send(self, command: str, answer: str) -> None:
        self._in.write(command + "\n")
        self._in.flush()
        self._expect(answer, command)

    def _expect(self, answer: str, command: str) -> None:
        line = self._out.readline().strip()
        if line != answer:
            raise KdcacheError(f"the loopback S3 server on port {self.port} answered {line or 'nothing'!r} to "
                               f"{command!r}")

    def make_bucket(self, name: str) -> None:
        self._send(f"bucket {name}", "ok")

    def pause(self) -> None:
        """Stop answering HTTP (connections are refused); buckets and objects are kept."""
        self._send("stop", "stopped")

    def resume(self) -> None:
        self._send("start", "started")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send("quit", "bye")
            except (BrokenPipeError, KdcacheError):
                pass
            self.proc.wait(timeout=30)

    def __enter__(self) -> "LoopbackS3":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FaultProxy:
    """A TCP proxy on the loopback interface in front of ``target_port``, to stage network faults while the
    server behind it keeps its data: ``pass`` forwards bytes both ways, ``stall`` keeps every connection
    open and swallows what either side sends (a dead load balancer, a half-open connection), ``cut``
    closes every connection and refuses new ones. Threads of this process; stopped by ``close()``.

        with FaultProxy(s3.port) as proxy:
            url = proxy.url           # point the client here
            proxy.set("stall"); proxy.set("pass")
    """

    def __init__(self, target_port: int) -> None:
        import threading
        self.target = ("127.0.0.1", target_port)
        self.mode = "pass"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode: str) -> None:
        if mode not in ("pass", "stall", "cut"):
            raise KdcacheError(f"proxy mode {mode!r}: use pass, stall or cut")
        with self._lock:
            self.mode = mode
            if mode == "cut":
                for c in self._conns:
                    _close(c)
                self._conns.clear()

    def _accept(self) -> None:
        import threading
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self.mode == "cut":
                    _close(client)
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    _close(client)
                    continue
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._closed:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            if self.mode == "stall":
                continue  # swallowed: the sender waits for an answer that never comes
            try:
                dst.sendall(data)
            except OSError:
                break
        _close(dst)
        _close(src)

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.set("cut")

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def _serve(port: int) -> None:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import WSGIRequestHandler
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    WSGIRequestHandler.protocol_version = "HTTP/1.1"  # keep connections open between requests, as S3 does
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print("started", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "stop":
            server.stop()
            print("stopped", flush=True)
        elif command == "start":
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            print("started", flush=True)
        elif command == "bucket":
            try:
                boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=arg)
                print("ok", flush=True)
            except Exception as e:
                print(f"error {e}".replace("\n", " "), flush=True)
        elif command == "quit":
            break
    server.stop()
    print("bye", flush=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
