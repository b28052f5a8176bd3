"""A real dockerd (Debian's docker.io 20.10, --experimental, with its own
containerd and runc) on the libdm plugin in the test kernel, walked as a
user walks it: ``docker load`` of a multi-layer image made offline here
(whiteouts, an opaque directory, hard and symbolic links), ``run``,
``diff`` (its exact output), ``commit``, ``save`` compared layer by layer
by digest with what was loaded, ``info``, a dockerd restart, and ``rm`` /
``rmi`` until the pool holds nothing but the plugin's base device
(thin_dump).  Then the plugin killed in the middle of a ``docker load``:
the load fails, the restarted plugin has undone the half-applied layer,
the same load then succeeds, and nothing leaks."""

from __future__ import annotations

import subprocess

import pytest
from support import witness
from support.docker.engine_util import (
    Dockerd,
    busybox_layer,
    layer_tar,
    prepare_kernel,
    save_archive,
    saved_layer_digests,
)
from support.docker.plugin_util import DockerPlugin, base_device

pytestmark = pytest.mark.kernel

DRIVER = "libdmwalk"
SOCKET = f"/run/docker/plugins/{DRIVER}.sock"

LOWER = [
    ("dir", None, 0o755),
    ("dir/a", b"a\n", 0o644),
    ("dir/b", b"b\n", 0o600),
    ("opq", None, 0o755),
    ("opq/x", b"x\n", 0o644),
    ("opq/y", b"y\n", 0o644),
    ("keep", b"kept\n", 0o644),
    ("gone", None, 0o755),
    ("gone/deep", b"d\n", 0o644),
    ("etc/motd", b"lower\n", 0o644),
]
UPPER = [
    ("dir", None, 0o755),
    ("dir/.wh.a", b"", 0o644),
    ("opq", None, 0o711),
    ("opq/.wh..wh..opq", b"", 0o644),
    ("opq/z", b"z\n", 0o644),
    (".wh.gone", b"", 0o644),
    ("tool", b"#!/bin/sh\necho tool\n", 0o4755, 1000, 1000),
    ("tool.hard", "=>tool", 0o4755, 1000, 1000),
    ("motd", "->etc/motd", 0o777),
]
TOP = [("etc", None, 0o755), ("etc/motd", b"top\n", 0o640, 0, 42)]


@pytest.fixture
def docker_env(make_pool, tmp_path):
    prepare_kernel()
    pool = make_pool(data_size="4G")
    data_root = tmp_path / "data"
    data_root.mkdir()
    # On the kernel's own memory, not hostfs (which cannot set a symbolic
    # link's own times, so copied trees would differ).
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600m", "tmpfs", str(data_root)], check=True
    )
    plugin = DockerPlugin(
        pool.directory, SOCKET, options=("dm.basesize=256M",), log=str(tmp_path / "plugin.log")
    ).start()
    dockerd = Dockerd(tmp_path, data_root, DRIVER)
    try:
        yield pool, plugin, dockerd
    finally:
        dockerd.stop()
        plugin.stop()
        subprocess.run(["umount", "-l", str(data_root)], capture_output=True)


def _run_lines(dockerd, *args):
    return dockerd.docker(*args).stdout.splitlines()


def _only_base_left(pool):
    """The pool holds the plugin's base device and nothing else (thin_dump),
    and no layer device is active (dmsetup)."""
    assert witness.thin_ids(pool.name) == {pool.device(base_device(pool)).thin_id}
    assert not [n for n in witness.names() if n.startswith(pool.name + "-docker-")]


def test_dockerd_walk(docker_env, tmp_path):
    pool, _plugin, dockerd = docker_env
    dockerd.start()
    image = tmp_path / "image.tar"
    layers = [busybox_layer(LOWER), layer_tar(UPPER), layer_tar(TOP)]
    loaded = save_archive(image, "libdmtest:latest", layers)
    assert _run_lines(dockerd, "load", "-i", str(image)) == ["Loaded image: libdmtest:latest"]

    out = _run_lines(
        dockerd,
        "run",
        "--name",
        "c1",
        "--network",
        "none",
        "libdmtest",
        "sh",
        "-c",
        "ls /dir /opq; cat /motd /keep 2>&1; ls /gone 2>&1; /tool.hard;"
        " echo hi > /new; rm /dir/b; mkdir -p /made/deep; echo changed > /opq/z",
    )
    # The whiteouts hid dir/a and gone; the opaque directory its old
    # entries; the symbolic link reads the top layer's motd.
    assert out == [
        "/dir:",
        "b",
        "",
        "/opq:",
        "z",
        "top",
        "kept",
        "ls: /gone: No such file or directory",
        "tool",
    ]
    assert _run_lines(dockerd, "diff", "c1") == [
        "C /dir",
        "D /dir/b",
        "A /made",
        "A /made/deep",
        "A /new",
        "C /opq",
        "C /opq/z",
    ]
    dockerd.docker("commit", "c1", "libdmtest:committed")
    committed_run = ["run", "--rm", "--network", "none", "libdmtest:committed"]
    assert _run_lines(dockerd, *committed_run, "cat", "/new", "/opq/z") == ["hi", "changed"]
    dockerd.docker("save", "-o", str(tmp_path / "saved.tar"), "libdmtest:latest")
    assert saved_layer_digests(tmp_path / "saved.tar") == loaded

    # A legacy build of two steps: each runs a container and commits it
    # (Diff of its layer, then Create and ApplyDiff of the new layer).
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text(
        "FROM libdmtest:latest\nRUN echo built > /built\nRUN rm /keep && mkdir /opq/new\n"
    )
    dockerd.docker("build", "--network", "none", "-t", "libdmtest:built", str(tmp_path / "ctx"))
    built_run = ["run", "--rm", "--network", "none", "libdmtest:built", "sh", "-c"]
    assert _run_lines(dockerd, *built_run, "cat /built; ls /opq; ls /keep 2>&1; true") == [
        "built",
        "new",
        "z",
        "ls: /keep: No such file or directory",
    ]

    info = dockerd.docker("info").stdout
    for line in (
        f"Storage Driver: {DRIVER}",
        f"Pool Name: {pool.name}",
        "Base Device Size: 256 MiB",
        "Backing Filesystem: ext4",
        "Data Space Total: 4 GiB",
    ):
        assert line in info, info

    dockerd.stop()
    dockerd.start()
    images = {line.split()[1] for line in _run_lines(dockerd, "images")[1:]}
    assert images == {"latest", "committed", "built"}
    assert _run_lines(dockerd, *committed_run, "cat", "/new") == ["hi"]
    assert _run_lines(dockerd, "diff", "c1")[0] == "C /dir"

    dockerd.docker("rm", "c1")
    dockerd.docker("rmi", "libdmtest:built", "libdmtest:committed", "libdmtest:latest")
    dockerd.stop()
    _only_base_left(pool)


def test_plugin_killed_mid_load_and_mid_run(docker_env, tmp_path):
    """The plugin dies while dockerd's ``load`` applies the second layer
    (a crash point after the tar is unpacked, before the layer is marked
    done): the load fails, the restarted plugin has deleted the half-made
    layer, and the same load then succeeds.  Then it dies while ``run``
    makes the container's first layer (its device made, not yet recorded
    done): the run fails, the restarted plugin has deleted that device, and
    the same run succeeds.  Then dockerd itself is killed with a container
    running, and the next dockerd removes it.  Nothing leaks."""
    pool, plugin, dockerd = docker_env

    def killed_during(*args):
        """Run ``docker ARGS`` while the armed plugin kills itself; restart
        the plugin as soon as it is dead (dockerd retries its calls for a
        while), then the command must have failed."""
        command = dockerd.docker_async(*args)
        assert plugin.wait(timeout=120) == -9
        del plugin.env["LIBDM_CRASH_AT"]
        plugin.start()
        out, _ = command.communicate(timeout=300)
        assert command.returncode != 0, out

    plugin.stop()
    plugin.env["LIBDM_CRASH_AT"] = "docker:apply:unpacked@2"
    plugin.start()
    dockerd.start()
    image = tmp_path / "image.tar"
    loaded = save_archive(
        image, "libdmtest:kill", [busybox_layer(LOWER), layer_tar(UPPER), layer_tar(TOP)]
    )
    killed_during("load", "-i", str(image))
    assert _run_lines(dockerd, "load", "-i", str(image)) == ["Loaded image: libdmtest:kill"]
    dockerd.docker("save", "-o", str(tmp_path / "saved.tar"), "libdmtest:kill")
    assert saved_layer_digests(tmp_path / "saved.tar") == loaded

    run = ["run", "--rm", "--network", "none", "libdmtest:kill", "cat", "/motd"]
    plugin.stop()
    plugin.env["LIBDM_CRASH_AT"] = "docker:create:device"
    plugin.start()
    killed_during(*run)
    assert _run_lines(dockerd, *run) == ["top"]

    # dockerd itself killed with a container running: the next dockerd
    # removes the container and its layers although the first never Put them.
    dockerd.docker(
        "run", "-d", "--name", "bg", "--network", "none", "libdmtest:kill", "sleep", "600"
    )
    dockerd.kill()
    dockerd.start()
    dockerd.docker("rm", "-f", "bg")
    dockerd.docker("container", "prune", "-f")
    dockerd.docker("rmi", "libdmtest:kill")
    dockerd.stop()
    with open("/proc/self/mountinfo") as fh:
        assert pool.directory not in fh.read()
    _only_base_left(pool)
