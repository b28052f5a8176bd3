"""Container image layers as a chain of thin snapshots.

A loop-file pool in a temporary directory; a base device with ext4; three
image layers, each a snapshot of the one below that adds and changes
files; two "containers" snapshotted from the top layer, each writing its
own files.  Every device is then checked to see exactly its own files, the
lineage tree and the pool report are printed, and everything is removed.

Run it as root on a machine with device-mapper, or anywhere through the
test kernel:

    python -m libdm.testing run python examples/layered_snapshots.py
"""

import os
import sys
import tempfile

import libdm

LAYERS = {
    # layer: (files added or changed, files removed)
    "layer1": ({"etc/os-release": "base os 1.0", "bin/sh": "shell v1"}, []),
    "layer2": ({"usr/lib/libc.so": "libc 2.36", "etc/os-release": "base os 1.1"}, []),
    "layer3": ({"app/server.py": "print('serving')", "bin/sh": "shell v2"}, ["usr/lib/libc.so"]),
}
CONTAINERS = {
    "container-a": {"data/a.log": "a was here"},
    "container-b": {"data/b.log": "b was here", "app/server.py": "print('patched')"},
}


def write_files(root, files, removed=()):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
    for rel in removed:
        os.unlink(os.path.join(root, rel))


def read_tree(root):
    """{relative path: content} of every regular file, lost+found aside."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path) as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def print_tree(pool):
    def walk(device, depth):
        used = device.status()
        print(
            f"  {'    ' * depth}{device.name} (id {device.thin_id}, "
            f"{libdm.format_size(device.size)}, {int(used.mapped) // 2} KiB mapped)"
        )
        for child in device.children():
            walk(child, depth + 1)

    for device in pool.devices():
        if device.parent is None:
            walk(device, 0)


def main():
    workdir = tempfile.mkdtemp(prefix="libdm-layers-")
    pool = libdm.Pool.create_loop(
        f"libdm-layers-{os.getpid()}", os.path.join(workdir, "pool"), data_size="1G"
    )
    failures = []
    try:
        print(
            f"pool {pool.name}: {pool.info().data_total // (1 << 20)} MiB of data on "
            f"sparse files in {pool.directory}"
        )
        base = pool.create_thin("base", "256M").format("ext4", label="base")
        pool.set_base_device("base")
        expected = {"base": {}}

        parent, state = base, {}
        for name, (files, removed) in LAYERS.items():
            used_before = pool.status().used_data
            layer = parent.snapshot(name)
            used_after = pool.status().used_data
            print(
                f"snapshot {name} of {parent.name}: {int(used_after - used_before)} new data "
                f"blocks (a snapshot shares everything until written)"
            )
            if used_after != used_before:
                failures.append(f"{name}: the snapshot itself took data blocks")
            with layer.mount() as root:
                write_files(root, files, removed)
            state = {k: v for k, v in {**state, **files}.items() if k not in removed}
            expected[name] = dict(state)
            parent = layer

        for name, files in CONTAINERS.items():
            container = parent.snapshot(name)
            with container.mount() as root:
                write_files(root, files)
            expected[name] = {**state, **files}

        print("\nchecking that every device sees exactly its own files:")
        for name, want in expected.items():
            with pool.device(name).mount(options="ro") as root:
                got = read_tree(root)
            verdict = "ok" if got == want else "WRONG"
            print(f"  {name:<12} {len(got)} files  {verdict}")
            if got != want:
                failures.append(f"{name}: expected {sorted(want)}, found {sorted(got)}")

        print("\nlineage:")
        print_tree(pool)

        # The base image can go before the layers built on it: they keep
        # their data, and the lineage shows them without it.
        pool.device("base").delete()
        first = next(iter(LAYERS))
        with pool.device(first).mount(options="ro") as root:
            intact = read_tree(root) == expected[first]
        print(f"\nbase deleted before its layers; {first} still intact: {intact}")
        if not intact or pool.device(first).parent is not None:
            failures.append(f"{first}: changed or still parented after its base was deleted")
        print_tree(pool)
        print("\npool report:")
        print(pool.info())
    finally:
        pool.destroy(remove_files=True)
        os.rmdir(workdir)
    left = [d.name for d in libdm.list_devices() if d.name.startswith(pool.name)]
    if left:
        failures.append(f"devices left behind: {left}")
    print("\n" + ("all checks passed" if not failures else "FAILED:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
