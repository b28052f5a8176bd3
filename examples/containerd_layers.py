"""Container image layers through containerd's snapshots API, on libdm.

Starts the libdm snapshotter plugin (``python -m libdm.snapshotter serve``,
what containerd's ``[proxy_plugins.libdm]`` would talk to) on a loop pool
in a temporary directory, then does what containerd does when it unpacks
an image: for each layer, Prepare a writable snapshot on top of the layer
below, write the layer's files into its mounts, and Commit it.  A View of
the top layer shows the stacked result, read-only.  Everything is removed
at the end.

Needs root, a device-mapper kernel and ``pip install libdm[containerd]``::

    python -m libdm.testing run python examples/containerd_layers.py
"""

import os
import shutil
import subprocess
import sys
import tempfile

import libdm
from libdm.snapshotter.client import KIND_NAMES, Client


def mount(mounts, target):
    m = mounts[0]
    options = ["-o", ",".join(m.options)] if m.options else []
    subprocess.run(["mount", "-t", m.type, *options, m.source, target], check=True)


def main():
    work = tempfile.mkdtemp(prefix="containerd-layers-")
    pool_dir, socket, target = (os.path.join(work, n) for n in ("pool", "snap.sock", "mnt"))
    os.mkdir(target)
    pool = libdm.Pool.create_loop(f"layers-demo-{os.getpid()}", pool_dir, data_size="1G")
    config = os.path.join(work, "snapshotter.toml")
    with open(config, "w") as fh:
        fh.write('base_image_size = "64M"\nfs_type = "ext4"\n[monitor]\nenabled = false\n')
    plugin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "libdm.snapshotter",
            "serve",
            "--pool",
            pool_dir,
            "--socket",
            socket,
            "--config",
            config,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        print(plugin.stdout.readline().strip())  # "serving on ..."
        client = Client(socket, namespace="example")
        layers = [
            {"etc/os-release": "NAME=demo\n", "app/run": "v1\n"},
            {"app/run": "v2\n", "app/data": "x" * 100000},
            {"etc/motd": "hello from layer 3\n"},
        ]
        parent = ""
        for n, files in enumerate(layers, 1):
            key, name = f"extract-layer{n}", f"layer{n}"
            mounts = client.prepare(key, parent)  # a thin snapshot of the layer below
            mount(mounts, target)
            for path, text in files.items():
                os.makedirs(os.path.dirname(os.path.join(target, path)), exist_ok=True)
                with open(os.path.join(target, path), "w") as fh:
                    fh.write(text)
            subprocess.run(["umount", target], check=True)
            client.commit(name, key)  # the device is left inactive
            size, _ = client.usage(name)
            print(f"{name}: committed on {mounts[0].source}, owns {size // 1024} KiB")
            parent = name

        mounts = client.view("rootfs-view", parent)
        print(f"view: {mounts[0].type} {mounts[0].source} -o {','.join(mounts[0].options)}")
        mount(mounts, target)
        try:
            for path in ("etc/os-release", "app/run", "etc/motd"):
                with open(os.path.join(target, path)) as fh:
                    print(f"  /{path}: {fh.read().strip()[:40]}")
        finally:
            subprocess.run(["umount", target], check=True)
        for info in client.list():
            print(f"  {info.name:12} {KIND_NAMES[info.kind]:9} parent={info.parent or '-'}")

        client.remove("rootfs-view")
        for n in range(len(layers), 0, -1):  # children before parents
            client.remove(f"layer{n}")
        print(f"removed; snapshots left: {len(client.list())}")
        client.close()
    finally:
        plugin.terminate()
        plugin.wait(timeout=60)
        pool.destroy(remove_files=True)
        shutil.rmtree(work)  # the config and the snapshotter's database, made above
    print("done")


if __name__ == "__main__":
    main()
