"""Docker's own devicemapper driver on a pool libdm made and handed over
(Pool.hand_over): the guide's direct-lvm setup with libdm in LVM's place.

A real dockerd (Debian's docker.io, ``--storage-opt dm.thinpooldev=...``)
loads an image and runs a container that writes past the pool's
autoextend threshold while libdm's monitor grows the pool; then the
machine reboots (a new kernel on the same files, everything live at the
halt but dockerd, which was stopped), ``Pool.open`` brings the pool back
without touching Docker's devices or its transaction id, and dockerd
comes back with its image, its container and the written data (checked by
checksum through ``docker cp``), until ``rm``/``rmi`` and thin_dump.

Each step runs in a kernel of its own (``run_in_kernel``); this file is
also the steps' script.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.host

MiB = 1 << 20


def _step(run_in_kernel, step: str, work: Path, pool_name: str) -> dict[str, object]:
    result = run_in_kernel(
        [sys.executable, __file__, step, str(work), pool_name], timeout=900, mem="1G"
    )
    log = work / "dockerd.log"
    tail = log.read_bytes()[-3000:].decode(errors="replace") if log.exists() else ""
    assert result.returncode == 0, result.stderr[-4000:] + result.console[-2000:] + tail
    with open(work / f"{step}.json") as fh:
        found: dict[str, object] = json.load(fh)
    return found


def test_dockers_driver_on_a_handed_over_pool_grows_and_survives_a_reboot(run_in_kernel, tmp_path):
    pool_name = f"libdmtest-dockerdm-{os.getpid()}"
    built = _step(run_in_kernel, "build", tmp_path, pool_name)
    # The monitor grew the pool while the container wrote.
    assert built["total_after"] > built["total_before"], built
    back = _step(run_in_kernel, "reboot", tmp_path, pool_name)
    assert back["transaction_id"] == built["transaction_id"]
    assert back["thin_ids"] == built["thin_ids"]
    assert back["live_before_dockerd"] == []  # libdm activated none of Docker's devices
    assert back["big"] == built["big"]  # the container's data, by checksum
    assert back["images"] == built["images"]
    assert back["total"] == built["total_after"]
    assert f"Pool Name: {pool_name}" in back["info"]
    # rm and rmi: Docker deleted its devices; only its base device is left.
    assert len(back["thin_ids_after_rmi"]) == 1


# -- the steps, inside the kernels -----------------------------------------------------


def _dockerd(work: Path, pool_name: str):  # type: ignore[no-untyped-def]
    from support.docker.engine_util import Dockerd

    data_root = work / "data"
    data_root.mkdir(exist_ok=True)
    return Dockerd(
        work,
        data_root,
        "devicemapper",
        options=(
            f"dm.thinpooldev=/dev/mapper/{pool_name}",
            "dm.override_udev_sync_check=true",
            "dm.fs=ext4",
            "dm.basesize=512M",
        ),
    )


def _pool_fields(pool_name: str) -> dict[str, object]:
    from support import witness

    _used, total = witness.pool_status(pool_name)[2].split("/")
    return {
        "transaction_id": witness.transaction_id(pool_name),
        "thin_ids": sorted(witness.thin_ids(pool_name)),
        "total": int(total),
    }


def _build(work: Path, pool_name: str) -> dict[str, object]:
    from support.docker.engine_util import busybox_layer, layer_tar, save_archive

    import libdm

    pool = libdm.Pool.create_loop(pool_name, work / "pool", data_size="128M")
    pool.hand_over("docker")
    before = _pool_fields(pool_name)["total"]
    dockerd = _dockerd(work, pool_name).start()
    image = work / "image.tar"
    save_archive(image, "dmtest:latest", [busybox_layer(), layer_tar([("motd", b"hi\n", 0o644)])])
    dockerd.docker("load", "-i", str(image))
    monitor = pool.monitor(threshold=70, percent=50).start()
    try:
        out = dockerd.docker(
            "run",
            "--name",
            "writer",
            "--network",
            "none",
            "dmtest",
            "sh",
            "-c",
            "dd if=/dev/urandom of=/big bs=1M count=110 conv=fsync 2>/dev/null && echo done",
            timeout=600,
        ).stdout
    finally:
        monitor.stop()
        monitor.join()
    assert out.strip() == "done", out
    got = work / "big-1"
    dockerd.docker("cp", "writer:/big", str(got))
    images = sorted(
        dockerd.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    )
    dockerd.stop()  # a clean stop of Docker; the pool stays live through the halt
    pool.close()
    fields = _pool_fields(pool_name)
    return {
        "total_before": before,
        "total_after": fields["total"],
        "transaction_id": fields["transaction_id"],
        "thin_ids": fields["thin_ids"],
        "big": hashlib.sha256(got.read_bytes()).hexdigest(),
        "images": images,
    }


def _reboot(work: Path, pool_name: str) -> dict[str, object]:
    from support import witness

    import libdm

    pool = libdm.Pool.open(work / "pool")
    fields = _pool_fields(pool_name)
    live = sorted(n for n in witness.names() if n != pool_name)
    dockerd = _dockerd(work, pool_name).start()
    got = work / "big-2"
    dockerd.docker("cp", "writer:/big", str(got))
    images = sorted(
        dockerd.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    )
    info = dockerd.docker("info").stdout
    dockerd.docker("rm", "writer")
    dockerd.docker("rmi", "dmtest:latest")
    dockerd.stop()
    left = sorted(witness.thin_ids(pool_name))
    pool.close()
    return {
        **fields,
        "live_before_dockerd": live,
        "big": hashlib.sha256(got.read_bytes()).hexdigest(),
        "images": images,
        "info": info,
        "thin_ids_after_rmi": left,
    }


def _main(step: str, work: str, pool_name: str) -> None:
    from support.docker.engine_util import prepare_kernel

    prepare_kernel()
    where = Path(work)
    result = _build(where, pool_name) if step == "build" else _reboot(where, pool_name)
    with open(where / f"{step}.json", "w") as fh:
        json.dump(result, fh)
        fh.flush()
        os.fsync(fh.fileno())
    subprocess.run(["sync"], check=False)


if __name__ == "__main__":
    _main(*sys.argv[1:4])
