"""A real containerd (Debian's 1.6) on the libdm plugin, in the test kernel:
``ctr images import --snapshotter libdm`` of an OCI image this test
builds (several layers, with whiteouts and an opaque directory), the
files read through a view's mounts, a container run from it with runc
(``ctr run``; its process reads the image and writes into its root, seen
afterwards through the container snapshot's mounts), and the layers gone
from the pool once containerd's garbage collector has removed the image."""

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
import time

import pytest
from support.containerd.build_conformance import build_probe
from support.containerd.snapshotter_util import (
    Plugin,
    base_device,
    make_pool,
    unmount_below,
    write_config,
)
from support.poll import wait_for

import libdm

pytestmark = pytest.mark.kernel

IMAGE = "docker.io/library/libdmtest:latest"

# (path, content or None for a directory, mode, uid, gid); "->x" is a symlink.
LAYERS = [
    [
        ("etc", None, 0o755, 0, 0),
        ("etc/hostname", b"one\n", 0o644, 0, 0),
        ("dir", None, 0o755, 0, 0),
        ("dir/a", b"a\n", 0o644, 0, 0),
        ("dir/b", b"b\n", 0o600, 0, 0),
        ("opq", None, 0o755, 0, 0),
        ("opq/x", b"x\n", 0o644, 0, 0),
        ("opq/y", b"y\n", 0o644, 0, 0),
        ("keep", b"kept\n", 0o644, 0, 0),
        ("tool", b"#!/bin/sh\n", 0o4755, 1000, 1000),
        ("link", "->keep", 0o777, 0, 0),
        ("gone", None, 0o755, 0, 0),
        ("gone/deep", b"d\n", 0o644, 0, 0),
    ],
    [
        ("dir", None, 0o755, 0, 0),
        ("dir/.wh.a", b"", 0o644, 0, 0),
        ("opq", None, 0o711, 0, 0),
        ("opq/.wh..wh..opq", b"", 0o644, 0, 0),
        ("opq/z", b"z\n", 0o644, 0, 0),
        (".wh.keep", b"", 0o644, 0, 0),
        ("moved", b"kept\n", 0o644, 0, 0),
        (".wh.gone", b"", 0o644, 0, 0),
    ],
    [
        ("etc", None, 0o755, 0, 0),
        ("etc/hostname", b"three\n", 0o640, 0, 42),
        ("dir", None, 0o755, 0, 0),
        ("dir/c", b"c\n", 0o644, 7, 8),
        ("gone", None, 0o700, 0, 0),
    ],
]


def _layer_tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content, mode, uid, gid in entries:
            info = tarfile.TarInfo(path)
            info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, 1700000000
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _arch():
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def build_oci_image(path, probe):
    """An OCI image layout archive of LAYERS, with the static program
    ``probe`` as /probe in the top layer; returns the layers' chain ids."""
    blobs = {}
    with open(probe, "rb") as fh:
        layers_spec = [*LAYERS[:-1], LAYERS[-1] + [("probe", fh.read(), 493, 0, 0)]]

    def add(data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    diff_ids, layers = [], []
    for entries in layers_spec:
        raw = _layer_tar(entries)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        gz = gzip.compress(raw, mtime=0)
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": add(gz),
                "size": len(gz),
            }
        )
    config = json.dumps(
        {
            "architecture": _arch(),
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": add(config),
                "size": len(config),
            },
            "layers": layers,
        }
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": add(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": _arch(), "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": IMAGE,
                        "org.opencontainers.image.ref.name": "latest",
                    },
                }
            ],
        }
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
            ("index.json", index),
        ] + [(f"blobs/sha256/{d[7:]}", b) for d, b in blobs.items()]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    chain = [diff_ids[0]]
    for d in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {d}".encode()).hexdigest())
    return chain


class Containerd:
    def __init__(self, tmp, plugin_socket):
        self.tmp = tmp
        self.address = str(tmp / "c.sock")
        config = tmp / "containerd.toml"
        config.write_text(f"""version = 2
root = "{tmp / "root"}"
state = "{tmp / "state"}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[proxy_plugins.libdm]
  type = "snapshot"
  address = "{plugin_socket}"
""")
        self.log = open(tmp / "containerd.log", "ab")  # noqa: SIM115 (containerd's)
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=self.log, stderr=self.log
        )
        if not wait_for(lambda: os.path.exists(self.address), timeout=60):
            self.stop()
            raise RuntimeError(
                "containerd did not start: " + (tmp / "containerd.log").read_text()[-3000:]
            )

    def ctr(self, *args, check=True):
        proc = subprocess.run(
            ["ctr", "--address", self.address, "--namespace", "libdmtest", *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def reaches_plugin(self):
        return (
            subprocess.run(
                [
                    "ctr",
                    "--address",
                    self.address,
                    "--namespace",
                    "libdmtest",
                    "snapshots",
                    "--snapshotter",
                    "libdm",
                    "ls",
                ],
                capture_output=True,
                timeout=60,
            ).returncode
            == 0
        )

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def test_ctr_imports_an_image_onto_the_plugin(tmp_path):
    assert shutil.which("containerd") and shutil.which("ctr"), (
        "containerd and ctr are needed (bash .ci/setup.sh installs Debian's containerd)"
    )
    name = f"libdmtest-ctd-{os.getpid()}"
    pool = make_pool(tmp_path / "pool", name, "1G")
    config = write_config(
        tmp_path / "snap.toml", base_image_size="64M", monitor={"enabled": False}
    )
    plugin = Plugin(
        tmp_path / "pool", tmp_path / "s.sock", config, log=tmp_path / "plugin.log"
    ).start()
    ctd = None
    try:
        chain = build_oci_image(tmp_path / "image.tar", build_probe())
        ctd = Containerd(tmp_path, tmp_path / "s.sock")
        ctd.ctr("images", "import", "--snapshotter", "libdm", str(tmp_path / "image.tar"))
        assert IMAGE in ctd.ctr("images", "ls", "-q").split()
        listed = ctd.ctr("snapshots", "--snapshotter", "libdm", "ls")
        for chain_id in chain:
            assert chain_id in listed, listed
        # Every layer is a committed thin device, inactive, a snapshot of the one below.
        devices = {d.name: d for d in libdm.Pool.load(str(tmp_path / "pool")).devices()}
        base = base_device(tmp_path / "pool")
        layers = [d for d in devices.values() if d.name.startswith("ctrd-") and d.name != base]
        assert len(layers) == len(LAYERS) and not any(d.active for d in layers)

        out = ctd.ctr("snapshots", "--snapshotter", "libdm", "view", "--mounts", "v1", chain[-1])
        mounts = [{k.lower(): v for k, v in m.items()} for m in json.loads(out)]
        assert len(mounts) == 1 and "ro" in mounts[0]["options"]
        target = tmp_path / "view"
        target.mkdir()
        subprocess.run(
            [
                "mount",
                "-t",
                mounts[0]["type"],
                "-o",
                ",".join(mounts[0]["options"]),
                mounts[0]["source"],
                str(target),
            ],
            check=True,
        )
        try:
            check_tree(target)
        finally:
            subprocess.run(["umount", str(target)], check=True)

        run_a_container(ctd, tmp_path)

        # Removing the image: containerd's garbage collector removes every
        # layer (and the view, which nothing holds) through the plugin.
        ctd.ctr("images", "rm", "--sync", IMAGE)
        assert wait_for(
            lambda: ctd.ctr("snapshots", "--snapshotter", "libdm", "ls").strip().count("\n") == 0,
            timeout=60,
        )
        left = {d.name for d in libdm.Pool.load(str(tmp_path / "pool")).devices()}
        assert left == {base_device(tmp_path / "pool")}
    finally:
        if ctd is not None:
            ctd.stop()
        plugin.stop()
        unmount_below(tmp_path)
        pool.destroy(remove_files=True)


def check_tree(root):
    def read(p):
        return (root / p).read_bytes()

    def meta(p):
        st = os.lstat(root / p)
        return st.st_mode & 0o7777, st.st_uid, st.st_gid

    assert read("etc/hostname") == b"three\n" and meta("etc/hostname") == (0o640, 0, 42)
    assert sorted(os.listdir(root / "dir")) == ["b", "c"]  # a whited out
    assert meta("dir/b") == (0o600, 0, 0) and meta("dir/c") == (0o644, 7, 8)
    assert sorted(os.listdir(root / "opq")) == ["z"]  # opaque: x and y hidden
    assert meta("opq")[0] == 0o711
    assert not os.path.lexists(root / "keep") and read("moved") == b"kept\n"
    assert os.readlink(root / "link") == "keep"  # dangling now, as in the image
    assert meta("tool") == (0o4755, 1000, 1000)
    assert sorted(os.listdir(root / "gone")) == [] and meta("gone")[0] == 0o700
    assert "lost+found" not in os.listdir(root)
    assert meta("probe") == (0o755, 0, 0)
    assert not any(n.startswith(".wh.") for _, dirs, files in os.walk(root) for n in dirs + files)


def run_a_container(ctd, tmp_path):
    """ctr run: runc starts /probe on the container's snapshot (a thin
    snapshot of the top layer, prepared through the plugin)."""
    if not os.path.ismount("/sys/fs/cgroup"):  # nothing is mounted there at boot
        subprocess.run(["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"], check=True)
    out = ctd.ctr("run", "--snapshotter", "libdm", IMAGE, "probe1", "/probe")
    seen = 'hostname-file="three\\n" dir=[b c] uid=0'
    # containerd's stdio may lose a short-lived process's output (seen
    # once); what the probe saw is also in its root, read below.
    assert not out or seen in out, out
    # The container's own snapshot holds what its process wrote.
    line = ctd.ctr(
        "snapshots", "--snapshotter", "libdm", "mounts", str(tmp_path / "c"), "probe1"
    ).strip()
    argv = line.split()
    if argv[-1] == "-o":  # no options: writable
        argv.pop()
    assert argv[:2] == ["mount", "-t"] and "-o" not in argv, line
    (tmp_path / "c").mkdir()
    subprocess.run(argv, check=True)
    try:
        assert (tmp_path / "c" / "probe-output").read_text() == seen + "\n"
        assert (tmp_path / "c" / "written-by-container").read_text() == "hello\n"
        assert (tmp_path / "c" / "etc" / "hostname").read_text() == "three\n"
    finally:
        subprocess.run(["umount", str(tmp_path / "c")], check=True)
    ctd.ctr("containers", "rm", "probe1")
    assert "probe1" not in ctd.ctr("snapshots", "--snapshotter", "libdm", "ls")


def _plugin_state(plugin, log):
    """What a failure needs said of the plugin: running or not, the end of
    its log, and the kernel's last words (an OOM kill, say)."""
    code = plugin.proc.poll() if plugin.proc is not None else "never started"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout[-2000:]
    return f"plugin exit status: {code}\n--- plugin log ---\n{tail}\n--- dmesg ---\n{dmesg}"


def test_plugin_killed_during_import_then_containerd_and_libdm_agree(tmp_path):
    """SIGKILL the plugin while containerd unpacks an image through it,
    restart it, import again: the image unpacks, containerd's snapshot
    listing and the plugin's agree, and once the image is removed the pool
    holds nothing but its base device."""
    import random

    from support import reliability

    name = f"libdmtest-ctdk-{os.getpid()}"
    pool = make_pool(tmp_path / "pool", name, "1G")
    config = write_config(
        tmp_path / "snap.toml", base_image_size="64M", monitor={"enabled": False}
    )
    plugin = Plugin(
        tmp_path / "pool", tmp_path / "s.sock", config, log=tmp_path / "plugin.log"
    ).start()
    ctd = None
    rng = random.Random(5)
    kills = reliability.scale(2, 8)
    try:
        chain = build_oci_image(tmp_path / "image.tar", build_probe())
        ctd = Containerd(tmp_path, tmp_path / "s.sock")
        for _ in range(kills):
            importing = subprocess.Popen(
                [
                    "ctr",
                    "--address",
                    ctd.address,
                    "--namespace",
                    "libdmtest",
                    "images",
                    "import",
                    "--snapshotter",
                    "libdm",
                    str(tmp_path / "image.tar"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(rng.uniform(0.0, 1.5))
            plugin.kill()
            importing.wait(timeout=300)
            plugin.start()
            # containerd redials the plugin with a backoff of up to 3 s.
            assert wait_for(ctd.reaches_plugin, timeout=30)
            # Images whose unpack failed are removed, and with them
            # whatever layers containerd recorded for them.
            ctd.ctr("images", "rm", "--sync", IMAGE, check=False)
        try:
            ctd.ctr("images", "import", "--snapshotter", "libdm", str(tmp_path / "image.tar"))
        except AssertionError as exc:
            state = _plugin_state(plugin, tmp_path / "plugin.log")
            raise AssertionError(f"{exc}\n{state}") from exc
        listed = ctd.ctr("snapshots", "--snapshotter", "libdm", "ls")
        assert all(c in listed for c in chain), listed
        # The plugin may still hold what killed imports left and containerd
        # never recorded (its keys are containerd's internal ones);
        # containerd's garbage collector removes those (it walks the plugin
        # and removes what it does not know) once the image goes.
        ours = plugin_rows(tmp_path / "pool")
        assert sum(kind == "committed" for _, _, kind, _ in ours) >= len(chain), ours
        assert all(state == "ready" for _, _, _, state in ours), ours
        ctd.ctr("images", "rm", "--sync", IMAGE)
        assert wait_for(
            lambda: not ctd.ctr("snapshots", "--snapshotter", "libdm", "ls").strip().count("\n"),
            timeout=60,
        )
        assert wait_for(lambda: plugin_rows(tmp_path / "pool") == [], timeout=60)
        left = {d.name for d in libdm.Pool.load(str(tmp_path / "pool")).devices()}
        assert left == {base_device(tmp_path / "pool")}
        reliability.record("snapshotter kills under containerd", kills=kills, leaked_devices=0)
    finally:
        if ctd is not None:
            ctd.stop()
        plugin.stop()
        unmount_below(tmp_path)
        pool.destroy(remove_files=True)


def plugin_rows(pool_dir):
    """The plugin's own records: (namespace, key, kind, state) rows."""
    import sqlite3

    db = sqlite3.connect(f"file:{pool_dir}/snapshotter.db?mode=ro", uri=True)
    try:
        return db.execute("SELECT namespace, key, kind, state FROM snapshots").fetchall()
    finally:
        db.close()
