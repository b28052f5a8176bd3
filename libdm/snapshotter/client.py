"""A small client of containerd's snapshots gRPC service, for tests,
benchmarks and examples: it talks to the libdm plugin, or to containerd's
own socket (``snapshotter`` names the snapshotter there)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from libdm.snapshotter.api import mount_pb2
from libdm.snapshotter.api import snapshots_pb2 as pb
from libdm.snapshotter.service import _SIGNATURES, NAMESPACE_KEY, SERVICE

__all__ = ["KIND_NAMES", "Client"]

#: The names of the wire's kinds (``Info.kind``), as containerd prints them.
KIND_NAMES: dict[int, str] = {
    pb.VIEW: "view",
    pb.ACTIVE: "active",
    pb.COMMITTED: "committed",
    pb.UNKNOWN: "unknown",
}


class Client:
    """``Client(socket, namespace="default", snapshotter="libdm")``; every
    method raises ``grpc.RpcError`` with the server's code."""

    def __init__(
        self,
        socket_path: str,
        namespace: str = "default",
        snapshotter: str = "libdm",
        timeout: float = 300,
    ) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.timeout = timeout
        # grpc's multi-callables: a request in, a response (or an iterator
        # of them) out.
        self._calls: dict[str, Callable[..., Any]] = {}
        for name, (req, resp, streaming) in _SIGNATURES.items():
            make = self.channel.unary_stream if streaming else self.channel.unary_unary
            self._calls[name] = make(
                f"/{SERVICE}/{name}",
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, _method: str, **fields: object) -> Any:
        """Call ``_method``; its response (grpc's, untyped: each caller
        names the message it gets)."""
        req = _SIGNATURES[_method].request(snapshotter=self.snapshotter, **fields)
        return self._calls[_method](
            req, timeout=self.timeout, metadata=((NAMESPACE_KEY, self.namespace),)
        )

    def wait_ready(self, timeout: float = 30) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        resp: pb.PrepareSnapshotResponse = self._call(
            "Prepare", key=key, parent=parent, labels=labels or {}
        )
        return list(resp.mounts)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        resp: pb.ViewSnapshotResponse = self._call(
            "View", key=key, parent=parent, labels=labels or {}
        )
        return list(resp.mounts)

    def mounts(self, key: str) -> list[mount_pb2.Mount]:
        resp: pb.MountsResponse = self._call("Mounts", key=key)
        return list(resp.mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self._call("Commit", name=name, key=key, labels=labels or {})

    def remove(self, key: str) -> None:
        self._call("Remove", key=key)

    def stat(self, key: str) -> pb.Info:
        resp: pb.StatSnapshotResponse = self._call("Stat", key=key)
        return resp.info

    def update(
        self, name: str, labels: Mapping[str, str], paths: Sequence[str] | None = None
    ) -> pb.Info:
        info = pb.Info(name=name, labels=labels)
        resp: pb.UpdateSnapshotResponse
        if paths is None:
            resp = self._call("Update", info=info)
        else:
            resp = self._call(
                "Update", info=info, update_mask=field_mask_pb2.FieldMask(paths=paths)
            )
        return resp.info

    def list(self, *filters: str) -> list[pb.Info]:
        responses: Iterable[pb.ListSnapshotsResponse] = self._call("List", filters=list(filters))
        return [i for resp in responses for i in resp.info]

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes) of snapshot ``key``."""
        r: pb.UsageResponse = self._call("Usage", key=key)
        return r.size, r.inodes

    def cleanup(self) -> None:
        self._call("Cleanup")
