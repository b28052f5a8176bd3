"""containerd's snapshots gRPC service over a :class:`Snapshotter`.

The methods are registered as a generic handler for the service
``containerd.services.snapshots.v1.Snapshots``; the messages are the
classes compiled from ``api/snapshots.proto``.  Errors become gRPC
statuses with containerd's codes (NotFound, AlreadyExists,
FailedPrecondition, InvalidArgument), which containerd turns back into its
own error kinds.  The namespace is the ``containerd-namespace`` gRPC
metadata of the call (``default`` when absent).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, NamedTuple, NoReturn

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from libdm._signals import stop_on_signals
from libdm.dm.errors import DeviceExistsError
from libdm.snapshotter import core
from libdm.snapshotter.api import mount_pb2
from libdm.snapshotter.api import snapshots_pb2 as pb
from libdm.snapshotter.store import Kind, SocketRecord

if TYPE_CHECKING:
    from libdm.snapshotter.config import Config

__all__ = ["SERVICE", "Server", "probe_socket", "serve"]

SERVE = "snapshotter serve"

logger = logging.getLogger("libdm.snapshotter")

SERVICE = "containerd.services.snapshots.v1.Snapshots"
NAMESPACE_KEY = "containerd-namespace"

_KINDS: dict[Kind, pb.Kind] = {
    Kind.UNKNOWN: pb.UNKNOWN,
    Kind.VIEW: pb.VIEW,
    Kind.ACTIVE: pb.ACTIVE,
    Kind.COMMITTED: pb.COMMITTED,
}
_KIND_OF: dict[int, Kind] = {wire: kind for kind, wire in _KINDS.items()}
_CODES: dict[str, grpc.StatusCode] = {
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
}


def _namespace(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_KEY:
            return str(value)
    return "default"


def _mounts(mounts: Iterable[core.Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
        for m in mounts
    ]


def _info(info: core.Info) -> pb.Info:
    msg = pb.Info(name=info.name, parent=info.parent, kind=_KINDS[info.kind], labels=info.labels)
    msg.created_at.FromNanoseconds(int(info.created * 1e9))
    msg.updated_at.FromNanoseconds(int(info.updated * 1e9))
    return msg


class _Methods:
    """The service's methods, named as in the .proto file."""

    def __init__(self, snapshotter: core.Snapshotter) -> None:
        self.sn = snapshotter

    def Prepare(
        self, req: pb.PrepareSnapshotRequest, ctx: grpc.ServicerContext
    ) -> pb.PrepareSnapshotResponse:
        return pb.PrepareSnapshotResponse(
            mounts=_mounts(self.sn.prepare(_namespace(ctx), req.key, req.parent, dict(req.labels)))
        )

    def View(
        self, req: pb.ViewSnapshotRequest, ctx: grpc.ServicerContext
    ) -> pb.ViewSnapshotResponse:
        return pb.ViewSnapshotResponse(
            mounts=_mounts(self.sn.view(_namespace(ctx), req.key, req.parent, dict(req.labels)))
        )

    def Mounts(self, req: pb.MountsRequest, ctx: grpc.ServicerContext) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts(self.sn.mounts(_namespace(ctx), req.key)))

    def Commit(self, req: pb.CommitSnapshotRequest, ctx: grpc.ServicerContext) -> empty_pb2.Empty:
        self.sn.commit(_namespace(ctx), req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    def Remove(self, req: pb.RemoveSnapshotRequest, ctx: grpc.ServicerContext) -> empty_pb2.Empty:
        self.sn.remove(_namespace(ctx), req.key)
        return empty_pb2.Empty()

    def Stat(
        self, req: pb.StatSnapshotRequest, ctx: grpc.ServicerContext
    ) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(self.sn.stat(_namespace(ctx), req.key)))

    def Update(
        self, req: pb.UpdateSnapshotRequest, ctx: grpc.ServicerContext
    ) -> pb.UpdateSnapshotResponse:
        info = core.Info(
            req.info.name,
            req.info.parent,
            _KIND_OF.get(req.info.kind, Kind.UNKNOWN),
            0,
            0,
            dict(req.info.labels),
        )
        paths = list(req.update_mask.paths) if req.HasField("update_mask") else []
        return pb.UpdateSnapshotResponse(info=_info(self.sn.update(_namespace(ctx), info, paths)))

    def List(
        self, req: pb.ListSnapshotsRequest, ctx: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        infos = self.sn.walk(_namespace(ctx), list(req.filters))
        for start in range(0, len(infos), 100):
            yield pb.ListSnapshotsResponse(info=[_info(i) for i in infos[start : start + 100]])

    def Usage(self, req: pb.UsageRequest, ctx: grpc.ServicerContext) -> pb.UsageResponse:
        size, inodes = self.sn.usage(_namespace(ctx), req.key)
        return pb.UsageResponse(size=int(size), inodes=inodes)

    def Cleanup(self, req: pb.CleanupRequest, ctx: grpc.ServicerContext) -> empty_pb2.Empty:
        self.sn.cleanup()
        return empty_pb2.Empty()


class _Signature(NamedTuple):
    """A method's request and response messages, and whether it streams
    its responses."""

    request: type[Message]
    response: type[Message]
    streaming: bool


_SIGNATURES: dict[str, _Signature] = {
    "Prepare": _Signature(pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse, False),
    "View": _Signature(pb.ViewSnapshotRequest, pb.ViewSnapshotResponse, False),
    "Mounts": _Signature(pb.MountsRequest, pb.MountsResponse, False),
    "Commit": _Signature(pb.CommitSnapshotRequest, empty_pb2.Empty, False),
    "Remove": _Signature(pb.RemoveSnapshotRequest, empty_pb2.Empty, False),
    "Stat": _Signature(pb.StatSnapshotRequest, pb.StatSnapshotResponse, False),
    "Update": _Signature(pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse, False),
    "List": _Signature(pb.ListSnapshotsRequest, pb.ListSnapshotsResponse, True),
    "Usage": _Signature(pb.UsageRequest, pb.UsageResponse, False),
    "Cleanup": _Signature(pb.CleanupRequest, empty_pb2.Empty, False),
}

#: A method of :class:`_Methods`, seen from gRPC: a request and the call's
#: context in; a response, or for a streaming method an iterator of them, out.
_Handler = Callable[[Message, grpc.ServicerContext], object]


def _abort(ctx: grpc.ServicerContext, name: str, exc: Exception) -> NoReturn:
    """End the call with the status for ``exc``: containerd's code for a
    :class:`~.core.SnapshotError`, INVALID_ARGUMENT for a ValueError, and
    UNKNOWN (logged with its traceback) for anything else."""
    if isinstance(exc, core.SnapshotError):
        ctx.abort(_CODES.get(exc.code, grpc.StatusCode.UNKNOWN), str(exc))
    if isinstance(exc, ValueError):
        ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    logger.exception("snapshotter: %s failed", name)
    ctx.abort(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
    raise AssertionError("grpc's ServicerContext.abort returned")  # it always raises


def _guarded(name: str, fn: _Handler, streaming: bool) -> _Handler:
    if streaming:

        def stream(req: Message, ctx: grpc.ServicerContext) -> Iterator[Message]:
            try:
                responses = fn(req, ctx)
                assert isinstance(responses, Iterator)
                yield from responses
            except Exception as exc:
                _abort(ctx, name, exc)

        return stream

    def unary(req: Message, ctx: grpc.ServicerContext) -> object:
        try:
            return fn(req, ctx)
        except Exception as exc:
            _abort(ctx, name, exc)

    return unary


def handler_for(snapshotter: core.Snapshotter) -> grpc.GenericRpcHandler:
    """The gRPC generic handler serving ``snapshotter``."""
    methods = _Methods(snapshotter)
    table = {}
    for name, (req, resp, streaming) in _SIGNATURES.items():
        fn = _guarded(name, getattr(methods, name), streaming)
        make = (
            grpc.unary_stream_rpc_method_handler
            if streaming
            else grpc.unary_unary_rpc_method_handler
        )
        table[name] = make(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )
    return grpc.method_handlers_generic_handler(SERVICE, table)


def _in_the_way(path: str, why: str, err: int = errno.EEXIST) -> DeviceExistsError:
    return DeviceExistsError(
        err,
        f"{path} {why}; the snapshotter serves only on a free path or on a stale socket "
        f"it made, and leaves anything else as it is: choose another --socket",
        SERVE,
        path,
    )


def probe_socket(path: str) -> os.stat_result | None:
    """What is at ``path``, where the snapshotter is to serve: None for
    nothing, the stat of a stale socket (a connection is refused: no
    program listens on it any more).

    Raises:
        DeviceExistsError: anything else is there: a socket a program
            answers on (or that cannot be probed), a file, a directory, a
            symlink (named, and nothing is changed).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        raise _in_the_way(path, f"exists and is not a socket ({_file_kind(st)})")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(5)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return st
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = f"is a socket that cannot be probed ({exc.strerror or exc})"
        raise _in_the_way(path, why) from None
    finally:
        probe.close()
    raise _in_the_way(path, "is a socket another program answers on", errno.EADDRINUSE)


def _file_kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    if stat.S_ISREG(st.st_mode):
        return "a regular file"
    return f"file type {stat.S_IFMT(st.st_mode):o}"


class Server:
    """The snapshotter served on a unix socket (mode 0600).

    The path must be free, or hold a stale socket this snapshotter made
    (recorded in its database when bound: path, inode and change time), which
    is replaced.  Anything else there is refused and left as it is (see
    :func:`probe_socket`).

    Raises:
        DeviceExistsError: something else is at ``socket_path``.
    """

    def __init__(
        self, snapshotter: core.Snapshotter, socket_path: str, *, workers: int = 8
    ) -> None:
        self.snapshotter = snapshotter
        self.socket_path = os.path.abspath(socket_path)
        stale = probe_socket(self.socket_path)
        if stale is not None:
            made = snapshotter.served_socket()
            if made is None or not made.made(self.socket_path, stale):
                raise _in_the_way(
                    self.socket_path,
                    "is a stale socket (no program answers on it) that this snapshotter "
                    "did not make; remove it if nothing uses it",
                )
            os.unlink(self.socket_path)  # its own, left by a run that did not stop
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        snapshotter.record_socket(SocketRecord.binding(self.socket_path))
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        self._server.add_generic_rpc_handlers((handler_for(snapshotter),))
        old = os.umask(0o077)
        try:
            self._server.add_insecure_port(f"unix://{self.socket_path}")
            self._server.start()
        finally:
            os.umask(old)
        st = os.lstat(self.socket_path)
        self._bound = SocketRecord.of(self.socket_path, st)
        snapshotter.record_socket(self._bound)

    def stop(self, grace: float = 5) -> None:
        """Stop serving and remove the socket, if it is still the one bound."""
        self._server.stop(grace).wait()
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if SocketRecord.of(self.socket_path, st) == self._bound:
            os.unlink(self.socket_path)
            self.snapshotter.record_socket(None)

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve(
    pool_dir: str,
    socket_path: str,
    config: Config,
    *,
    ready: Callable[[Server], object] | None = None,
    exiting: bool = False,
) -> None:
    """Open the pool, recover, serve until SIGTERM or SIGINT, then stop
    cleanly (calls in progress finish, the socket is removed, the pool
    and the store are closed).  ``ready(server)`` is called once the
    socket accepts calls.  ``exiting``: the caller exits once this returns
    (the ``serve`` command), so SIGTERM and SIGINT stay ignored after it."""
    import libdm
    from libdm.thin.monitor import Monitor

    stop = threading.Event()
    # From the start to the last close a signal asks for a clean stop: a
    # signal during the start stops the plugin once it is up, and a
    # second one while it stops does not cut the stop short.
    with stop_on_signals(stop.set, then_ignore=exiting):
        # Refused before anything changes: a socket another program answers
        # on, or anything else that is not a socket.
        probe_socket(os.path.abspath(socket_path))
        pool = libdm.Pool.open(pool_dir)
        monitor: Monitor[libdm.Pool] | None = None
        try:
            snapshotter = core.Snapshotter(pool, config)
            try:
                m = config.monitor
                if m.enabled:
                    monitor = Monitor(
                        pool,
                        m.threshold,
                        m.percent,
                        metadata_threshold=m.metadata_threshold,
                        interval=m.interval,
                        max_data_size=m.max_data_size or None,
                    ).start()
                server = Server(snapshotter, socket_path)
                try:
                    logger.info("snapshotter: serving pool %s on %s", pool.name, socket_path)
                    if ready is not None:
                        ready(server)
                    stop.wait()
                finally:
                    server.stop()
            finally:
                if monitor is not None:
                    monitor.stop()
                snapshotter.close()
        finally:
            pool.close()
