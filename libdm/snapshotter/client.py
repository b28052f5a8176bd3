"""A small client of containerd's snapshots gRPC service, for tests,
benchmarks and examples: it talks to the libdm plugin, or to containerd's
own socket (``snapshotter`` names the snapshotter there)."""

import grpc
from google.protobuf import field_mask_pb2

from libdm.snapshotter.api import snapshots_pb2 as pb
from libdm.snapshotter.service import _SIGNATURES, NAMESPACE_KEY, SERVICE

__all__ = ["KIND_NAMES", "Client"]

KIND_NAMES = {
    pb.VIEW: "view",
    pb.ACTIVE: "active",
    pb.COMMITTED: "committed",
    pb.UNKNOWN: "unknown",
}


class Client:
    """``Client(socket, namespace="default", snapshotter="libdm")``; every
    method raises ``grpc.RpcError`` with the server's code."""

    def __init__(self, socket_path, namespace="default", snapshotter="libdm", timeout=300):
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.timeout = timeout
        self._calls = {}
        for name, (req, resp, streaming) in _SIGNATURES.items():
            make = self.channel.unary_stream if streaming else self.channel.unary_unary
            self._calls[name] = make(
                f"/{SERVICE}/{name}",
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, _method, **fields):
        req = _SIGNATURES[_method][0](snapshotter=self.snapshotter, **fields)
        return self._calls[_method](
            req, timeout=self.timeout, metadata=((NAMESPACE_KEY, self.namespace),)
        )

    def wait_ready(self, timeout=30):
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def prepare(self, key, parent="", labels=None):
        return list(self._call("Prepare", key=key, parent=parent, labels=labels or {}).mounts)

    def view(self, key, parent="", labels=None):
        return list(self._call("View", key=key, parent=parent, labels=labels or {}).mounts)

    def mounts(self, key):
        return list(self._call("Mounts", key=key).mounts)

    def commit(self, name, key, labels=None):
        self._call("Commit", name=name, key=key, labels=labels or {})

    def remove(self, key):
        self._call("Remove", key=key)

    def stat(self, key):
        return self._call("Stat", key=key).info

    def update(self, name, labels, paths=None):
        info = pb.Info(name=name, labels=labels)
        mask = None if paths is None else field_mask_pb2.FieldMask(paths=paths)
        if mask is None:
            return self._call("Update", info=info).info
        return self._call("Update", info=info, update_mask=mask).info

    def list(self, *filters):
        return [i for resp in self._call("List", filters=list(filters)) for i in resp.info]

    def usage(self, key):
        r = self._call("Usage", key=key)
        return r.size, r.inodes

    def cleanup(self):
        self._call("Cleanup")
