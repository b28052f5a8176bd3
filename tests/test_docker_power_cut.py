"""A power cut under dockerd on the libdm plugin: the kernel stops without
a sync or a teardown while ``docker load`` applies a large layer, then a
new kernel boots on the same files.

The first kernel loads an image, runs a container that writes and syncs
a file, and then cuts the power in the middle of a second ``docker load``
(once the plugin has made the device of one of its layers).  The second
kernel starts the plugin (whose ``Pool.open`` brings the pool back) and
dockerd: the first image and the container's synced file are there, the
second image is either whole (its layers' digests as loaded) or absent
and loads again, and after ``rm`` and ``rmi`` the pool holds the plugin's
base device and nothing else (thin_dump): no layer lost, none leaked.

Each step runs in a kernel of its own (``run_in_kernel``); this file is
also the steps' script.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.host

DRIVER = "libdmcut"
SOCKET = f"/run/docker/plugins/{DRIVER}.sock"
MiB = 1 << 20


def _step(run_in_kernel, step: str, work: Path, pool_name: str) -> dict[str, object]:
    result = run_in_kernel(
        [sys.executable, __file__, step, str(work), pool_name], timeout=900, mem="1G"
    )
    tails = []
    for name in ("dockerd.log", "plugin.log"):
        log = work / name
        if log.exists():
            tails.append(f"--- {name}\n" + log.read_bytes()[-3000:].decode(errors="replace"))
    assert result.returncode == 0, "\n".join(
        [result.stderr[-4000:], result.console[-2000:], *tails]
    )
    with open(work / f"{step}.json") as fh:
        found: dict[str, object] = json.load(fh)
    return found


def test_a_power_cut_mid_load_loses_no_layer_and_leaks_no_device(run_in_kernel, tmp_path):
    pool_name = f"libdmtest-dockercut-{os.getpid()}"
    cut = _step(run_in_kernel, "build", tmp_path, pool_name)
    assert cut["load_running_at_cut"], "the power was cut after the load had finished"
    back = _step(run_in_kernel, "reboot", tmp_path, pool_name)
    assert back["images_at_boot"][:1] == ["cut:a"], back
    assert back["a"] == "A"
    assert back["new"] == "written\n"
    # The second image: whole or absent after the cut, whole once loaded again.
    assert back["b_digests"] == cut["b_digests"]
    assert back["b"] == "B"
    assert back["big"] == cut["big"]
    assert back["thin_ids_left"] == [back["base_thin_id"]], back
    assert back["live_layers_left"] == [], back


# -- the steps, inside the kernels -----------------------------------------------------


def _both(work: Path):  # type: ignore[no-untyped-def]
    from support.docker.engine_util import Dockerd
    from support.docker.plugin_util import DockerPlugin

    data_root = work / "data"
    data_root.mkdir(exist_ok=True)
    plugin = DockerPlugin(
        str(work / "pool"), SOCKET, options=("dm.basesize=128M",), log=str(work / "plugin.log")
    )
    return plugin, Dockerd(work, data_root, DRIVER)


def _image_b(work: Path) -> tuple[Path, list[str], str]:
    from support.docker.engine_util import busybox_layer, layer_tar, save_archive

    big = random.Random(7).randbytes(48 * MiB)
    path = work / "b.tar"
    layers = [busybox_layer(), layer_tar([("big", big, 0o644)]), layer_tar([("b", b"B\n", 0o644)])]
    return path, save_archive(path, "cut:b", layers), hashlib.sha256(big).hexdigest()


def _layer_devices(pool_name: str) -> list[str]:
    from support import witness

    return sorted(n for n in witness.names() if n.startswith(f"{pool_name}-docker-"))


def _build(work: Path, pool_name: str) -> dict[str, object]:
    from support.docker.engine_util import busybox_layer, layer_tar, save_archive
    from support.poll import until

    import libdm

    libdm.Pool.create_loop(pool_name, work / "pool", data_size="2G").close()
    plugin, dockerd = _both(work)
    plugin.start()
    dockerd.start()
    save_archive(work / "a.tar", "cut:a", [busybox_layer(), layer_tar([("a", b"A\n", 0o644)])])
    dockerd.docker("load", "-i", str(work / "a.tar"))
    write = "echo written > /new; sync"
    dockerd.docker("run", "--name", "c1", "--network", "none", "cut:a", "sh", "-c", write)
    b_path, b_digests, big = _image_b(work)
    before = set(_layer_devices(pool_name))
    load = dockerd.docker_async("load", "-i", str(b_path))
    # The cut comes once the plugin has made a device of the new image.
    until(
        lambda: set(_layer_devices(pool_name)) - before or load.poll() is not None,
        "the load to make a device",
        300,
    )
    time.sleep(0.3)
    return {"load_running_at_cut": load.poll() is None, "b_digests": b_digests, "big": big}


def _reboot(work: Path, pool_name: str) -> dict[str, object]:
    from support import witness
    from support.docker.engine_util import saved_layer_digests
    from support.docker.plugin_util import base_device

    import libdm

    plugin, dockerd = _both(work)
    plugin.start()
    dockerd.start()

    def lines(*args: str) -> list[str]:
        return list(dockerd.docker(*args).stdout.splitlines())

    images = sorted(lines("images", "--format", "{{.Repository}}:{{.Tag}}"))
    a = lines("run", "--rm", "--network", "none", "cut:a", "cat", "/a")
    dockerd.docker("cp", "c1:/new", str(work / "new"))
    if "cut:b" not in images:
        dockerd.docker("load", "-i", str(work / "b.tar"))
    dockerd.docker("save", "-o", str(work / "b-saved.tar"), "cut:b")
    b = lines("run", "--rm", "--network", "none", "cut:b", "cat", "/b")
    dockerd.docker("cp", "--", f"{_container(dockerd)}:/big", str(work / "big"))
    dockerd.docker("container", "prune", "-f")
    dockerd.docker("rm", "-f", "c1")
    dockerd.docker("rmi", "cut:a", "cut:b")
    dockerd.stop()
    plugin.stop()
    base = base_device(types.SimpleNamespace(directory=str(work / "pool")))
    pool = libdm.Pool.open(work / "pool")
    try:
        base_id = pool.device(base).thin_id
    finally:
        pool.close()
    return {
        "images_at_boot": images,
        "a": "".join(a),
        "new": (work / "new").read_text(),
        "b": "".join(b),
        "b_digests": saved_layer_digests(work / "b-saved.tar"),
        "big": hashlib.sha256((work / "big").read_bytes()).hexdigest(),
        "base_thin_id": base_id,
        "thin_ids_left": sorted(witness.thin_ids(pool_name)),
        "live_layers_left": _layer_devices(pool_name),
    }


def _container(dockerd) -> str:  # type: ignore[no-untyped-def]
    """A stopped container of image cut:b to copy from."""
    return str(dockerd.docker("create", "--network", "none", "cut:b").stdout.strip())


def _main(step: str, work: str, pool_name: str) -> None:
    from support.docker.engine_util import prepare_kernel

    prepare_kernel()
    where = Path(work)
    result = _build(where, pool_name) if step == "build" else _reboot(where, pool_name)
    # Only the findings are synced: the halt that follows is the power cut.
    with open(where / f"{step}.json", "w") as fh:
        json.dump(result, fh)
        fh.flush()
        os.fsync(fh.fileno())


if __name__ == "__main__":
    _main(*sys.argv[1:4])
