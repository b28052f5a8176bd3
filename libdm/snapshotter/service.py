"""containerd's snapshots gRPC service over a :class:`Snapshotter`.

The methods are registered as a generic handler for the service
``containerd.services.snapshots.v1.Snapshots``; the messages are the
classes compiled from ``api/snapshots.proto``.  Errors become gRPC
statuses with containerd's codes (NotFound, AlreadyExists,
FailedPrecondition, InvalidArgument), which containerd turns back into its
own error kinds.  The namespace is the ``containerd-namespace`` gRPC
metadata of the call (``default`` when absent).
"""

import contextlib
import logging
import os
import signal
import threading
from concurrent import futures

import grpc
from google.protobuf import empty_pb2

from libdm.snapshotter import core
from libdm.snapshotter.api import mount_pb2
from libdm.snapshotter.api import snapshots_pb2 as pb

__all__ = ["SERVICE", "Server", "serve"]

logger = logging.getLogger("libdm.snapshotter")

SERVICE = "containerd.services.snapshots.v1.Snapshots"
NAMESPACE_KEY = "containerd-namespace"

_KINDS = {core.st.VIEW: pb.VIEW, core.st.ACTIVE: pb.ACTIVE, core.st.COMMITTED: pb.COMMITTED}
_CODES = {
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
}


def _namespace(context):
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_KEY:
            return value
    return "default"


def _mounts(mounts):
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
        for m in mounts
    ]


def _info(info):
    msg = pb.Info(name=info.name, parent=info.parent, kind=_KINDS[info.kind], labels=info.labels)
    msg.created_at.FromNanoseconds(int(info.created * 1e9))
    msg.updated_at.FromNanoseconds(int(info.updated * 1e9))
    return msg


class _Methods:
    def __init__(self, snapshotter):
        self.sn = snapshotter

    def Prepare(self, req, ctx):
        return pb.PrepareSnapshotResponse(
            mounts=_mounts(self.sn.prepare(_namespace(ctx), req.key, req.parent, dict(req.labels)))
        )

    def View(self, req, ctx):
        return pb.ViewSnapshotResponse(
            mounts=_mounts(self.sn.view(_namespace(ctx), req.key, req.parent, dict(req.labels)))
        )

    def Mounts(self, req, ctx):
        return pb.MountsResponse(mounts=_mounts(self.sn.mounts(_namespace(ctx), req.key)))

    def Commit(self, req, ctx):
        self.sn.commit(_namespace(ctx), req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    def Remove(self, req, ctx):
        self.sn.remove(_namespace(ctx), req.key)
        return empty_pb2.Empty()

    def Stat(self, req, ctx):
        return pb.StatSnapshotResponse(info=_info(self.sn.stat(_namespace(ctx), req.key)))

    def Update(self, req, ctx):
        info = core.Info(req.info.name, req.info.parent, None, 0, 0, dict(req.info.labels))
        paths = list(req.update_mask.paths) if req.HasField("update_mask") else []
        return pb.UpdateSnapshotResponse(info=_info(self.sn.update(_namespace(ctx), info, paths)))

    def List(self, req, ctx):
        infos = self.sn.walk(_namespace(ctx), list(req.filters))
        for start in range(0, len(infos), 100):
            yield pb.ListSnapshotsResponse(info=[_info(i) for i in infos[start : start + 100]])

    def Usage(self, req, ctx):
        size, inodes = self.sn.usage(_namespace(ctx), req.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, req, ctx):
        self.sn.cleanup()
        return empty_pb2.Empty()


_SIGNATURES = {
    "Prepare": (pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse, False),
    "View": (pb.ViewSnapshotRequest, pb.ViewSnapshotResponse, False),
    "Mounts": (pb.MountsRequest, pb.MountsResponse, False),
    "Commit": (pb.CommitSnapshotRequest, empty_pb2.Empty, False),
    "Remove": (pb.RemoveSnapshotRequest, empty_pb2.Empty, False),
    "Stat": (pb.StatSnapshotRequest, pb.StatSnapshotResponse, False),
    "Update": (pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse, False),
    "List": (pb.ListSnapshotsRequest, pb.ListSnapshotsResponse, True),
    "Usage": (pb.UsageRequest, pb.UsageResponse, False),
    "Cleanup": (pb.CleanupRequest, empty_pb2.Empty, False),
}


def _guarded(name, fn, streaming):
    def abort(ctx, exc):
        if isinstance(exc, core.SnapshotError):
            ctx.abort(_CODES.get(exc.code, grpc.StatusCode.UNKNOWN), str(exc))
        if isinstance(exc, ValueError):
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        logger.exception("snapshotter: %s failed", name)
        ctx.abort(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")

    if streaming:

        def handler(req, ctx):
            try:
                yield from fn(req, ctx)
            except Exception as exc:
                abort(ctx, exc)
    else:

        def handler(req, ctx):
            try:
                return fn(req, ctx)
            except Exception as exc:
                abort(ctx, exc)

    return handler


def handler_for(snapshotter):
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


class Server:
    """The snapshotter served on a unix socket (mode 0600)."""

    def __init__(self, snapshotter, socket_path, *, workers=8):
        self.snapshotter = snapshotter
        self.socket_path = os.path.abspath(socket_path)
        if os.path.exists(self.socket_path):
            import stat

            if not stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                raise FileExistsError(f"{self.socket_path} exists and is not a socket")
            os.unlink(self.socket_path)  # a stale socket of an earlier run
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        self._server.add_generic_rpc_handlers((handler_for(snapshotter),))
        old = os.umask(0o077)
        try:
            self._server.add_insecure_port(f"unix://{self.socket_path}")
            self._server.start()
        finally:
            os.umask(old)

    def stop(self, grace=5):
        self._server.stop(grace).wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def wait(self):
        self._server.wait_for_termination()


def serve(pool_dir, socket_path, config, *, ready=None):
    """Open the pool, recover, serve until SIGTERM or SIGINT, then stop
    cleanly (calls in progress finish, the socket is removed, the pool
    and the store are closed).  ``ready(server)`` is called once the
    socket accepts calls."""
    import libdm
    from libdm.thin.monitor import Monitor

    pool = libdm.Pool.open(pool_dir)
    monitor = None
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
            stop = threading.Event()
            previous = {
                sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)
            }
            try:
                logger.info("snapshotter: serving pool %s on %s", pool.name, socket_path)
                if ready is not None:
                    ready(server)
                while not stop.wait(3600):
                    pass
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                server.stop()
        finally:
            if monitor is not None:
                monitor.stop()
            snapshotter.close()
    finally:
        pool.close()
