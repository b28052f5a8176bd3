"""A pool whose thin devices are handed to another program (Pool.hand_over):
libdm keeps the pool (reactivation, growth, reports) and never touches a
thin device or the transaction id.

"Another program" is played here with dmsetup, as Docker's devicemapper
driver drives the pool (``create_thin`` and ``set_transaction_id``
messages, thin devices of its own); tests/test_docker*.py run Docker's own
driver on such a pool.  Every check is made with dmsetup, thin_dump and
checksums, not by asking libdm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import witness

import libdm

MiB = 1 << 20


def foreign_thin(pool_name: str, dm: str, thin_id: int, txid: int, sectors: int = 16384) -> str:
    """What Docker's driver does for a new device: a thin id made by a
    message, the transaction id moved, and a thin device of its own name
    (no uuid of libdm's).  Returns the device's path."""
    witness.dmsetup("message", pool_name, "0", f"create_thin {thin_id}")
    witness.dmsetup("message", pool_name, "0", f"set_transaction_id {txid - 1} {txid}")
    return activate_foreign(pool_name, dm, thin_id, sectors)


def activate_foreign(pool_name: str, dm: str, thin_id: int, sectors: int = 16384) -> str:
    witness.dmsetup("create", dm, "--table", f"0 {sectors} thin /dev/mapper/{pool_name} {thin_id}")
    witness.dmsetup("mknodes", dm)
    return f"/dev/mapper/{dm}"


def fill(path: str, seed: int, size: int = 4 * MiB) -> str:
    data = (seed.to_bytes(4, "little") * (size // 4))[:size]
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return witness.checksum(path, size)


@pytest.mark.kernel
def test_a_handed_over_pool_is_managed_but_its_thin_devices_are_never_touched(make_pool, dm_name):
    pool = make_pool(data_size="64M")
    pool.hand_over("docker")
    assert pool.handed_to == "docker"
    other = dm_name("docker-1")
    path = foreign_thin(pool.name, other, thin_id=7, txid=1)
    digest = fill(path, 1)
    table_before = witness.table(other)

    # libdm refuses every thin-device change, naming the program.
    with pytest.raises(libdm.HandedOverError, match="docker"):
        pool.create_thin("mine", "8M")
    with pytest.raises(libdm.NoSuchDeviceError):
        pool.device("docker-1")
    assert pool.devices() == []

    # Reopening while live: no refusal for the moved transaction id, and
    # nothing done to the thin device.
    again = libdm.Pool.open(pool.directory)
    again.close()
    assert witness.transaction_id(pool.name) == 1
    assert witness.thin_ids(pool.name) == {7}

    # It grows while the other program writes.
    before = int(witness.pool_status(pool.name)[2].split("/")[1])
    pool.resize("128M")
    after = int(witness.pool_status(pool.name)[2].split("/")[1])
    assert after == 2 * before
    digest2 = fill(path, 2)
    assert witness.table(other) == table_before
    assert witness.checksum(path, 4 * MiB) == digest2 != digest
    assert witness.transaction_id(pool.name) == 1

    report = pool.info().as_dict()
    assert report["Thin Devices Handed To"] == "docker"

    # Its files are not removed without force: the other program's data is in them.
    with pytest.raises(libdm.HandedOverError, match="force"):
        pool.destroy(remove_files=True)
    assert os.path.exists(os.path.join(pool.directory, "data"))
    witness.dmsetup("remove", other)
    pool.destroy(remove_files=True, force=True)
    assert not witness.names() & {pool.name}


@pytest.mark.kernel
def test_the_monitor_grows_a_handed_over_pool_while_the_other_program_writes(make_pool, dm_name):
    pool = make_pool(data_size="64M")
    pool.hand_over("docker")
    other = dm_name("docker-1")
    path = foreign_thin(pool.name, other, thin_id=1, txid=1, sectors=2 * 64 * 2048)
    digest = fill(path, 9, 56 * MiB)  # 87% of the data
    steps = pool.monitor(threshold=80, percent=50).check()
    assert [(s.part, s.ok) for s in steps] == [("data", True)], steps
    _used, total = witness.pool_status(pool.name)[2].split("/")
    assert int(total) * 64 * 1024 == 96 * MiB
    assert witness.checksum(path, 56 * MiB) == digest
    assert witness.transaction_id(pool.name) == 1 and witness.thin_ids(pool.name) == {1}
    witness.dmsetup("remove", other)


@pytest.mark.kernel
def test_a_pool_that_libdm_did_not_hand_over_is_still_refused(make_pool, dm_name):
    pool = make_pool(data_size="64M")
    other = dm_name("docker-1")
    foreign_thin(pool.name, other, thin_id=3, txid=1)
    with pytest.raises(libdm.StateError, match="another program"):
        libdm.Pool.open(pool.directory)
    witness.dmsetup("remove", other)


@pytest.mark.kernel
def test_hand_over_refuses_a_pool_with_libdm_devices(make_pool):
    pool = make_pool(data_size="64M")
    pool.create_thin("base", "8M")
    with pytest.raises(libdm.StateError, match="base"):
        pool.hand_over("docker")
    assert pool.handed_to is None
    pool.device("base").delete()
    pool.hand_over("docker")
    pool.hand_over("docker")  # the same program again: nothing to do
    with pytest.raises(libdm.HandedOverError, match="docker"):
        pool.hand_over("podman")
    with pytest.raises(ValueError):
        pool.hand_over("no spaces")


@pytest.mark.kernel
def test_the_cli_hands_over_at_creation_and_refuses_thin_commands(dm_name, tmp_path):
    name = dm_name("pool")
    directory = tmp_path / "p"
    env = {k: v for k, v in os.environ.items() if k != "LIBDM_POOL"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "libdm", *args], capture_output=True, text=True, env=env
        )

    made = cli(
        "pool", "create", name, "--loop", str(directory), "--data-size", "64M", "--for-docker"
    )
    assert made.returncode == 0, made.stderr
    info = cli("pool", "info", "--json", "--pool", str(directory))
    assert json.loads(info.stdout)["Thin Devices Handed To"] == "docker"
    refused = cli("thin", "create", "x", "8M", "--pool", str(directory))
    assert refused.returncode == 1 and "handed to docker" in refused.stderr
    assert "Traceback" not in refused.stderr
    kept = cli("pool", "destroy", "--remove-files", "--pool", str(directory))
    assert kept.returncode == 1 and "force" in kept.stderr
    gone = cli("pool", "destroy", "--remove-files", "--force", "--pool", str(directory))
    assert gone.returncode == 0, gone.stderr


# -- after a power cut ---------------------------------------------------------------


def _step(run_in_kernel, step: str, directory, pool_name: str) -> dict[str, object]:
    result = run_in_kernel(
        [sys.executable, __file__, step, str(directory), pool_name], timeout=300
    )
    assert result.returncode == 0, result.stderr + result.console[-2000:]
    with open(os.path.join(directory, "..", "result.json")) as fh:
        found: dict[str, object] = json.load(fh)
    return found


@pytest.mark.host
def test_after_a_power_cut_open_brings_the_pool_back_and_leaves_the_devices(
    run_in_kernel, tmp_path
):
    directory = tmp_path / "pool"
    pool_name = f"libdmtest-handover-{os.getpid()}"
    built = _step(run_in_kernel, "build", directory, pool_name)
    # A new kernel: nothing is live.  libdm brings the pool up; the other
    # program's device is not activated by it, and its data is intact.
    back = _step(run_in_kernel, "reopen", directory, pool_name)
    assert back["transaction_id"] == built["transaction_id"] == 2
    assert back["thin_ids"] == built["thin_ids"] == [1, 2]
    assert back["live_before_activation"] == []
    assert back["checksums"] == built["checksums"]
    assert back["data_blocks"] == built["data_blocks"]


def _main(step: str, directory: str, pool_name: str) -> None:
    """Steps run inside a test kernel by the power-cut test; each leaves
    everything live, and the kernel stops without syncing."""
    result: dict[str, object] = {}
    devices = {"layer-a": 1, "layer-b": 2}
    if step == "build":
        pool = libdm.Pool.create_loop(pool_name, directory, data_size="64M")
        pool.hand_over("docker")
        checksums = {}
        for txid, (dm, thin_id) in enumerate(devices.items(), 1):
            path = foreign_thin(pool.name, f"{pool_name}-{dm}", thin_id, txid)
            checksums[dm] = fill(path, thin_id)
        result["checksums"] = checksums
    else:
        pool = libdm.Pool.open(directory)
        prefix = f"{pool_name}-"
        result["live_before_activation"] = sorted(
            n for n in witness.names() if n.startswith(prefix)
        )
        result["checksums"] = {
            dm: witness.checksum(
                activate_foreign(pool_name, f"{pool_name}-{dm}", thin_id), 4 * MiB
            )
            for dm, thin_id in devices.items()
        }
    result["transaction_id"] = witness.transaction_id(pool_name)
    result["thin_ids"] = sorted(witness.thin_ids(pool_name))
    result["data_blocks"] = witness.pool_status(pool_name)[2]
    pool.close()
    with open(os.path.join(directory, "..", "result.json"), "w") as fh:
        json.dump(result, fh)
        fh.flush()
        os.fsync(fh.fileno())


if __name__ == "__main__":
    _main(*sys.argv[1:4])
