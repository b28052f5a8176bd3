"""Docker image layers through the libdm graph-driver plugin.

Serves the plugin (``python -m libdm.docker serve``, what ``dockerd
--experimental --storage-driver NAME`` talks to) on a loop pool in a
temporary directory, then sends it the calls dockerd sends: for each
layer of an image, Create on the layer below and ApplyDiff of the layer's
tar (the third layer deletes a file with a whiteout); for a container,
CreateReadWrite on the top layer, Get to write into it, Changes to list
what it changed; then Remove of everything.

Needs root and a device-mapper kernel::

    python -m libdm.testing run python examples/docker_layers.py
"""

import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile

import libdm


class Plugin(http.client.HTTPConnection):
    """One call to the plugin's unix socket, as Docker's proxy makes it."""

    def __init__(self, path):
        super().__init__("localhost", timeout=120)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


def call(sock, method, body=b"", query=""):
    conn = Plugin(sock)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn.request("POST", f"/{method}{query}", body=body)
    reply = json.loads(conn.getresponse().read())
    conn.close()
    if reply.get("Err"):
        raise RuntimeError(f"{method}: {reply['Err']}")
    return reply


def layer(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main():
    work = tempfile.mkdtemp(prefix="docker-layers-")
    pool_dir, sock = os.path.join(work, "pool"), os.path.join(work, "plugin.sock")
    pool = libdm.Pool.create_loop(f"docker-demo-{os.getpid()}", pool_dir, data_size="1G")
    pool.close()
    plugin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "libdm.docker",
            "serve",
            "--pool",
            pool_dir,
            "--socket",
            sock,
            "--storage-opt",
            "dm.basesize=64M",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        print(plugin.stdout.readline().decode().strip())
        call(sock, "GraphDriver.Init", {"Home": os.path.join(work, "home"), "Opts": []})
        image = [
            {"etc/motd": b"hello from layer 1\n", "app/run": b"v1\n"},
            {"app/run": b"v2\n", "app/old": b"to be deleted\n"},
            {"app/.wh.old": b"", "etc/motd": b"hello from layer 3\n"},
        ]
        parent = ""
        for i, files in enumerate(image, 1):
            name = f"layer{i}"
            call(sock, "GraphDriver.Create", {"ID": name, "Parent": parent})
            size = call(
                sock, "GraphDriver.ApplyDiff", layer(files), f"?id={name}&parent={parent}"
            )["Size"]
            print(f"{name}: {size} bytes applied on {parent or 'the base'}")
            parent = name
        call(sock, "GraphDriver.CreateReadWrite", {"ID": "ctr", "Parent": parent})
        root = call(sock, "GraphDriver.Get", {"ID": "ctr"})["Dir"]
        for path in ("app/run", "etc/motd"):
            with open(os.path.join(root, path)) as fh:
                print(f"/{path}: {fh.read().strip()}")
        print("app/old there:", os.path.exists(os.path.join(root, "app/old")))
        with open(os.path.join(root, "app/log"), "w") as fh:
            fh.write("written by the container\n")
        call(sock, "GraphDriver.Put", {"ID": "ctr"})
        changes = call(sock, "GraphDriver.Changes", {"ID": "ctr", "Parent": parent})["Changes"]
        print("changes:", ", ".join(f"{'CAD'[c['Kind']]} {c['Path']}" for c in changes))
        meta = call(sock, "GraphDriver.GetMetadata", {"ID": "ctr"})["Metadata"]
        print(f"container device: {meta['DeviceName']} (thin id {meta['DeviceId']})")
        for name in ("ctr", "layer3", "layer2", "layer1"):
            call(sock, "GraphDriver.Remove", {"ID": name})
        call(sock, "GraphDriver.Cleanup")
    finally:
        plugin.terminate()
        plugin.wait()
        libdm.Pool.open(pool_dir).destroy(remove_files=True)
        shutil.rmtree(work, ignore_errors=True)
    print("done")


if __name__ == "__main__":
    main()
