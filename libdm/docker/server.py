"""Docker's legacy (v1) graph-driver plugin protocol over a :class:`Driver`.

JSON over HTTP on a unix socket, as Docker's ``daemon/graphdriver/proxy.go``
speaks it: ``POST /Plugin.Activate`` and ``POST /GraphDriver.<Call>``.
Answers carry ``Err`` for a refused call.  ``Diff`` answers with the layer
tar itself, streamed; ``ApplyDiff`` takes the tar as its request body
(dockerd sends it chunked) and its layer and parent in the query string.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import IO, Any, BinaryIO

from libdm._signals import stop_on_signals
from libdm.docker.driver import DockerError, Driver, DriverOptions

__all__ = ["DEFAULT_SOCKET", "Server", "serve"]

logger = logging.getLogger("libdm.docker")

DEFAULT_SOCKET = "/run/docker/plugins/libdm.sock"
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
_LINE = 65537


class _ChunkedReader(io.RawIOBase):
    """A request body sent with ``Transfer-Encoding: chunked``, decoded."""

    def __init__(self, rfile: BinaryIO | io.BufferedIOBase) -> None:
        self.rfile, self.left, self.done = rfile, 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.done:
            return 0
        if self.left == 0:
            line = self.rfile.readline(_LINE)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise DockerError(f"a bad chunk header in the request body: {line!r}") from None
            if size == 0:
                while self.rfile.readline(_LINE) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.done = True
                return 0
            self.left = size
        data = self.rfile.read(min(len(buffer), self.left))
        if not data:
            raise DockerError("the request body ended inside a chunk")
        buffer[: len(data)] = data
        self.left -= len(data)
        if self.left == 0:
            self.rfile.readline(_LINE)  # the chunk's CRLF
        return len(data)


class _LimitedReader(io.RawIOBase):
    """A request body of ``Content-Length`` bytes."""

    def __init__(self, rfile: BinaryIO | io.BufferedIOBase, length: int) -> None:
        self.rfile, self.left = rfile, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0:
            return 0
        data = self.rfile.read(min(len(buffer), self.left))
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)


class _ChunkedWriter(io.RawIOBase):
    """An answer body sent with ``Transfer-Encoding: chunked``."""

    def __init__(self, wfile: BinaryIO | io.BufferedIOBase) -> None:
        self.wfile = wfile

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = len(data)
        if size:
            self.wfile.write(b"%x\r\n" % size + bytes(data) + b"\r\n")
        return size

    def finish(self) -> None:
        """The last chunk: the body is complete."""
        self.wfile.write(b"0\r\n\r\n")


def _error_status(method: str) -> int:
    """Diff answers with a tar, so its errors need an HTTP error status
    (Docker's client then reads ``Err``); the JSON calls carry ``Err`` in
    a 200 answer, as Docker's proxy reads it."""
    return 500 if method == "GraphDriver.Diff" else 200


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: Answers are buffered and sent at the end of each call (the handler
    #: flushes then): the headers and the JSON go in one write, not two.
    wbufsize = 1 << 16
    server: _UnixServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("docker: " + format, *args)

    def _body(self) -> IO[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw: io.RawIOBase = _ChunkedReader(self.rfile)
        else:
            raw = _LimitedReader(self.rfile, int(self.headers.get("Content-Length") or 0))
        return io.BufferedReader(raw, 1 << 16)

    def _reply(self, payload: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        method = url.path.lstrip("/")
        driver = self.server.driver
        body = self._body()
        try:
            if method == "GraphDriver.ApplyDiff":
                query = urllib.parse.parse_qs(url.query)
                size = driver.apply_diff(
                    query.get("id", [""])[0], query.get("parent", [""])[0], body
                )
                self._reply({"Err": "", "Size": size})
                return
            request = json.loads(body.read() or b"{}")
            if method == "GraphDriver.Diff":
                self._diff(driver, request)
                return
            reply = self._call(driver, method, request)
        except (DockerError, OSError, ValueError) as exc:
            logger.warning("docker: %s failed: %s", method, exc)
            self._drain(body)
            self._reply({"Err": str(exc)}, _error_status(method))
            return
        except Exception as exc:
            logger.exception("docker: %s failed", method)
            self._drain(body)
            self._reply({"Err": f"{type(exc).__name__}: {exc}"}, _error_status(method))
            return
        self._reply(reply)

    @staticmethod
    def _drain(body: IO[bytes]) -> None:
        with contextlib.suppress(Exception):
            while body.read(1 << 16):
                pass

    def _call(self, driver: Driver, method: str, req: dict[str, Any]) -> dict[str, Any]:
        layer = str(req.get("ID") or "")
        parent = str(req.get("Parent") or "")
        if method == "Plugin.Activate":
            return {"Implements": ["GraphDriver"]}
        if method == "GraphDriver.Init":
            if req.get("UIDMaps") or req.get("GIDMaps"):
                raise DockerError(
                    "the libdm plugin does not support user namespace remapping "
                    "(dockerd --userns-remap)"
                )
            driver.init(str(req.get("Home") or ""), [str(o) for o in req.get("Opts") or []])
            return {"Err": ""}
        if method in ("GraphDriver.Create", "GraphDriver.CreateReadWrite"):
            opts = {str(k): str(v) for k, v in (req.get("StorageOpt") or {}).items()}
            driver.create(layer, parent, opts)
            return {"Err": ""}
        if method == "GraphDriver.Remove":
            driver.remove(layer)
            return {"Err": ""}
        if method == "GraphDriver.Get":
            return {"Err": "", "Dir": driver.get(layer, str(req.get("MountLabel") or ""))}
        if method == "GraphDriver.Put":
            driver.put(layer)
            return {"Err": ""}
        if method == "GraphDriver.Exists":
            return {"Exists": driver.exists(layer)}
        if method == "GraphDriver.Status":
            return {"Status": [list(pair) for pair in driver.status()]}
        if method == "GraphDriver.GetMetadata":
            return {"Err": "", "Metadata": driver.metadata(layer)}
        if method == "GraphDriver.Cleanup":
            driver.cleanup()
            return {"Err": ""}
        if method == "GraphDriver.Capabilities":
            return {"Capabilities": {"ReproducesExactDiffs": False}}
        if method == "GraphDriver.Changes":
            changes = driver.changes(layer, parent)
            return {"Err": "", "Changes": [{"Path": c.path, "Kind": int(c.kind)} for c in changes]}
        if method == "GraphDriver.DiffSize":
            return {"Err": "", "Size": driver.diff_size(layer, parent)}
        raise DockerError(f"{method} is not a graph-driver call")

    def _diff(self, driver: Driver, req: dict[str, Any]) -> None:
        layer = str(req.get("ID") or "")
        parent = str(req.get("Parent") or "")
        if not driver.exists(layer) or (parent and not driver.exists(parent)):
            raise DockerError(
                f"layer {layer if not driver.exists(layer) else parent} does not exist"
            )
        # The tar is streamed in chunks: a failure after the 200 leaves out
        # the last chunk, so the client reads a broken body, never a tar
        # that merely looks short.
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        out = _ChunkedWriter(self.wfile)
        try:
            driver.diff(layer, parent, out)  # type: ignore[arg-type]
        except Exception:
            logger.exception("docker: Diff of %s failed mid-stream; the answer is cut", layer)
            return
        out.finish()


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    driver: Driver


def _stale_socket(driver: Driver, socket_path: str) -> bool:
    """Whether ``socket_path`` is a socket an earlier run of the plugin
    made that nobody answers on (False: nothing is there).

    Raises:
        FileExistsError: something else is in the way (named).
    """
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST, f"{socket_path} exists and is not a socket; it is left alone"
        )
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(socket_path)
        except ConnectionRefusedError:
            pass
        else:
            raise FileExistsError(errno.EEXIST, f"something already serves on {socket_path}")
    if not driver.made_socket(socket_path, st.st_dev, st.st_ino):
        raise FileExistsError(
            errno.EEXIST,
            f"{socket_path} is a socket this plugin did not make; it is left "
            f"alone (remove it if it is stale)",
        )
    return True


class Server:
    """The plugin served on ``socket_path`` (mode 0600).

    An existing file there is replaced only if it is the socket an earlier
    run of the plugin on this pool made (its device and inode are in the
    plugin's records) and nobody answers on it.

    Raises:
        FileExistsError: something else is in the way (named).
    """

    def __init__(self, driver: Driver, socket_path: str) -> None:
        self.driver = driver
        self.socket_path = os.path.abspath(socket_path)
        self._clear_stale()
        os.makedirs(os.path.dirname(self.socket_path), mode=0o755, exist_ok=True)
        old = os.umask(0o177)
        try:
            self._server = _UnixServer(self.socket_path, _Handler)
        finally:
            os.umask(old)
        self._server.driver = driver
        st = os.lstat(self.socket_path)
        driver.record_socket(self.socket_path, st.st_dev, st.st_ino)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="libdm-docker", daemon=True
        )
        self._thread.start()

    def _clear_stale(self) -> None:
        if _stale_socket(self.driver, self.socket_path):
            os.unlink(self.socket_path)

    def stop(self) -> None:
        """Stop serving (a call in progress finishes) and remove the socket."""
        self._server.shutdown()
        self._server.server_close()
        st = None
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.socket_path)
        if st is not None and self.driver.made_socket(self.socket_path, st.st_dev, st.st_ino):
            os.unlink(self.socket_path)
        self._thread.join(timeout=30)


def serve(
    pool_dir: str,
    socket_path: str = DEFAULT_SOCKET,
    options: DriverOptions | None = None,
    *,
    ready: Callable[[Server], object] | None = None,
    exiting: bool = False,
) -> None:
    """Open the pool, recover, serve until SIGTERM or SIGINT, then stop
    (the socket is removed, the pool closed; mounted layers stay mounted
    for the dockerd that uses them).  ``exiting``: the caller exits once
    this returns (the ``serve`` command), so SIGTERM and SIGINT stay
    ignored after it."""
    import libdm

    stop = threading.Event()
    # From the start to the last close a signal asks for a clean stop: a
    # signal during the start stops the plugin once it is up, and a
    # second one while it stops does not cut the stop short.
    with stop_on_signals(stop.set, then_ignore=exiting):
        pool = libdm.Pool.open(pool_dir)
        try:
            # The plugin's lock is taken here, and the socket checked, before
            # recovery changes anything another plugin may be working on.
            driver = Driver(pool, options, recover_at_start=False)
            try:
                _stale_socket(driver, socket_path)
                driver.recover()
                server = Server(driver, socket_path)
                try:
                    logger.info("docker: serving pool %s on %s", pool.name, socket_path)
                    if ready is not None:
                        ready(server)
                    stop.wait()
                finally:
                    server.stop()
            finally:
                driver.close()
        finally:
            pool.close()
