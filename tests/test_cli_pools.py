"""The ``libdm`` pool and thin commands in a kernel: a loop pool from
create to destroy, block pools, extend, monitor, resize, adopt, open;
checked against dmsetup, losetup and thin_dump (never against libdm
itself), with one failure per command."""

import io
import os
import signal
import subprocess
import sys

import pytest
from support import witness
from support.blockio import attach, devno
from support.cli import as_json, failed, ok, run, sh

import libdm
from libdm import cli

kernel = pytest.mark.kernel
pytestmark = pytest.mark.usefixtures("no_libdm_pool")

MiB = 1 << 20


# -- pool and thin commands (kernel) --------------------------------------------------------


def losetup_files():
    """{loop device: backing file} from losetup."""
    out = subprocess.run(
        ["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


def below(number):
    """The block devices under device ``major:minor``: itself, or for a
    linear device-mapper device the devices its table maps."""
    try:
        with open(f"/sys/dev/block/{number}/dm/name") as fh:
            name = fh.read().strip()
    except FileNotFoundError:
        return {number}
    return {line.split()[3] for line in witness.table(name) if line.split()[2] == "linear"}


def fill(path, megabytes):
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(megabytes):
            os.pwrite(fd, bytes([i % 251 + 1]) * MiB, i * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


@kernel
def test_a_loop_pool_from_create_to_destroy(cli_run, dm_name, tmp_path):
    directory, name = tmp_path / "pool", dm_name("pool")
    r = ok(
        cli_run(
            "pool",
            "create",
            name,
            "--loop",
            directory,
            "--data-size",
            "128M",
            "--block-size",
            "128K",
            "--feature",
            "skip_block_zeroing",
            "--min-free-space",
            "5",
        )
    )
    assert r.out == f"/dev/mapper/{name}\n"
    fields = witness.table(name)[0].split()
    assert fields[:3] == ["0", str(128 << 11), "thin-pool"]
    assert fields[5:] == ["256", "0", "1", "skip_block_zeroing"]
    meta, data = witness.pool_devices(name)
    files = losetup_files()
    assert files[meta] == str(directory / "metadata") and files[data] == str(directory / "data")
    P = ["--pool", directory]

    assert ok(cli_run("thin", "create", "base", "64M", *P)).out == f"/dev/mapper/{name}-base\n"
    assert ok(cli_run("thin", "snapshot", "base", "layer1", *P)).out.strip().endswith("-layer1")
    ok(cli_run("thin", "snapshot", "layer1", "layer2", *P, "--debug"))
    rows = as_json(cli_run("thin", "ls", "--json", *P))
    assert [(r["name"], r["parent"], r["active"]) for r in rows] == [
        ("base", None, True),
        ("layer1", "base", True),
        ("layer2", "layer1", True),
    ]
    assert {r["thin_id"] for r in rows} == witness.thin_ids(name)
    pool_devno = f"{witness.info(name)['major']}:{witness.info(name)['minor']}"
    for row in rows:
        assert row["size"] == 64 * MiB and row["path"] == f"/dev/mapper/{row['dm_name']}"
        assert witness.table(row["dm_name"]) == [
            f"0 {64 << 11} thin {pool_devno} {row['thin_id']}"
        ]
    text = ok(cli_run("thin", "ls", *P)).out.splitlines()
    assert text[0].split() == ["NAME", "ID", "SIZE", "PARENT", "ACTIVE", "PATH"]
    assert text[2].split() == [
        "layer1",
        str(rows[1]["thin_id"]),
        "64",
        "MiB",
        "base",
        "yes",
        f"/dev/mapper/{name}-layer1",
    ]
    tree = as_json(cli_run("thin", "ls", "--tree", "--json", *P))
    assert tree[0]["name"] == "base"
    assert tree[0]["children"][0]["children"][0]["name"] == "layer2"
    drawing = ok(cli_run("thin", "ls", "--tree", *P)).out.splitlines()
    assert drawing[0].startswith("base  (id ") and drawing[2].startswith("  └─layer2  (id ")

    info = as_json(cli_run("pool", "info", "--json", *P))
    status = witness.pool_status(name)
    used, total = map(int, status[2].split("/"))
    assert info["Pool Name"] == name and info["Pool Blocksize"] == "128 KiB"
    assert info["Data loop file"] == str(directory / "data")
    assert info["Data file"] == witness.pool_devices(name)[1]
    assert info["bytes"]["data_total"] == total * 128 * 1024 == 128 * MiB
    assert info["bytes"]["data_used"] == used * 128 * 1024
    assert info["transaction_id"] == witness.transaction_id(name) == 3
    assert info["devices"] == 3 and info["state"] == "rw"
    report = ok(cli_run("pool", "info", *P)).out
    assert report.startswith(f" Pool Name: {name}\n") and " Data Space Total: 128 MiB\n" in report
    st = as_json(cli_run("pool", "status", "--json", *P))
    assert st["line"] == " ".join(witness.pool_status(name))
    assert st["total_data_blocks"] == total and st["transaction_id"] == 3
    assert "Transaction id:     3\n" in ok(cli_run("pool", "status", *P)).out

    ok(cli_run("message", name, "0", "reserve_metadata_snap"))
    assert witness.pool_status(name)[3] != "-"
    assert as_json(cli_run("pool", "status", "--json", *P))["held_root"] is not None
    ok(cli_run("message", name, "0", "release_metadata_snap"))
    assert witness.pool_status(name)[3] == "-"

    forest = as_json(cli_run("ls", "--tree", "--json", *P))
    node = next(n for n in forest if n["name"] == f"{name}-layer2")
    assert node["pool"]["lineage"] == ["layer1", "base"]
    assert (node["pool"]["device"], node["pool"]["thin_id"]) == ("layer2", rows[2]["thin_id"])
    pool_node = node["deps"][0]
    assert pool_node["name"] == name and pool_node["pool"]["role"] == "pool"
    assert sorted(f"{d['major']}:{d['minor']}" for d in pool_node["deps"]) == sorted(
        witness.table(name)[0].split()[3:5]
    )
    drawing = ok(cli_run("ls", "--tree", *P)).out
    assert (
        f"{name}-layer2 ({node['major']}:{node['minor']})  [layer2, thin id "
        f"{rows[2]['thin_id']}, snapshot of layer1 < base]\n"
    ) in drawing
    listed = {e["name"]: e for e in as_json(cli_run("ls", "--json", *P))}
    assert listed[f"{name}-layer1"]["pool"]["origin"] == "base"
    assert "pool" not in as_json(cli_run("ls", "--json"))[0]  # no pool given, no notes
    assert "snapshot of base" in ok(cli_run("ls", *P)).out

    r = ok(cli_run("pool", "resize", "256M", "--metadata-size", "4M", *P))
    assert r.out == f"pool {name}: data 256 MiB, metadata 4 MiB\n"
    assert witness.table(name)[0].split()[1] == str(256 << 11)
    assert os.stat(directory / "data").st_size == 256 * MiB
    assert os.stat(directory / "metadata").st_size == 4 * MiB
    assert witness.pool_status(name)[1].endswith("/1024")

    ok(cli_run("thin", "deactivate", "layer2", *P))
    assert f"{name}-layer2" not in witness.names()
    assert [r["active"] for r in as_json(cli_run("thin", "ls", "--json", *P))] == [
        True,
        True,
        False,
    ]
    assert ok(cli_run("thin", "activate", "layer2", *P)).out == f"/dev/mapper/{name}-layer2\n"
    assert witness.table(f"{name}-layer2") == [
        f"0 {64 << 11} thin {pool_devno} {rows[2]['thin_id']}"
    ]
    ok(cli_run("thin", "delete", "layer2", *P))
    assert f"{name}-layer2" not in witness.names()
    assert witness.thin_ids(name) == {rows[0]["thin_id"], rows[1]["thin_id"]}

    ok(cli_run("pool", "destroy", "--remove-files", *P))
    assert not {name, f"{name}-base", f"{name}-layer1"} & witness.names()
    assert not directory.exists()
    assert str(directory / "data") not in losetup_files().values()


@kernel
def test_pool_and_thin_failures_are_one_line(dm_name, tmp_path):
    directory, name = tmp_path / "pool", dm_name("pool")
    P = ["--pool", directory]
    ok(run("pool", "create", name, "--loop", directory, "--data-size", "64M"))
    ok(run("thin", "create", "vol", "16M", *P))
    failed(
        run("pool", "create", name, "--loop", tmp_path / "other", "--data-size", "64M"),
        1,
        "exists already",
        "[EEXIST]",
    )
    failed(
        run(
            "pool",
            "create",
            dm_name("p2"),
            "--loop",
            tmp_path / "p2",
            "--data-size",
            "64M",
            "--feature",
            "warp_speed",
        ),
        2,
        "unknown thin-pool feature warp_speed",
    )
    failed(
        run(
            "pool",
            "create",
            dm_name("p3"),
            "--loop",
            tmp_path / "p3",
            "--data-size",
            "64M",
            "--block-size",
            "96K",
        ),
        2,
        "multiple of 128 sectors",
    )
    failed(run("thin", "create", "vol", "16M", *P), 1, "thin create vol:", "already has")
    failed(run("thin", "create", "a/b", "16M", *P), 2, "'/'")
    failed(run("thin", "snapshot", "nope", "snap", *P), 1, "thin snapshot nope snap:", "[ENXIO]")
    for verb in ("delete", "activate", "deactivate"):
        failed(run("thin", verb, "nope", *P), 1, f"thin {verb} nope:", "no device named 'nope'")
    failed(run("pool", "resize", "32M", *P), 2, "pool resize:")
    failed(run("pool", "resize", "1G", "--pool", tmp_path / "none"), 1, "no pool state")
    failed(run("pool", "status", "--pool", tmp_path / "none"), 1, "no pool state")
    failed(run("pool", "destroy", "--pool", tmp_path / "none"), 1, "no pool state")
    failed(run("thin", "ls", "--pool", tmp_path / "none"), 1, "no pool state")
    failed(run("ls", "--pool", tmp_path / "none"), 1, "ls:", "no pool state")
    failed(run("pool", "monitor", "--iterations", "1", "--pool", tmp_path / "none"), 1)
    failed(run("pool", "open", tmp_path / "none"), 1, "pool open", "no pool state")
    fd = os.open(f"/dev/mapper/{name}-vol", os.O_RDONLY)
    try:
        failed(run("pool", "destroy", *P), 1, "pool destroy:", "[EBUSY]")
    finally:
        os.close(fd)
    assert name in witness.names()
    # The same through python -m: one line, no traceback.
    failed(sh("thin", "delete", "nope", *P), 1, "thin delete nope:", "[ENXIO]")
    failed(sh("thin", "create", "vol", "16M", *P), 1, "already has")
    ok(run("pool", "destroy", "--remove-files", *P))


@kernel
@pytest.mark.parametrize(
    "column, corrupt",
    [
        ("config", "{}"),
        ("config", "not json"),
        ("config", "[]"),
        ("kind", "weird"),
    ],
)
def test_a_corrupt_pool_store_fails_with_exit_1(dm_name, tmp_path, column, corrupt):
    import sqlite3

    directory, name = tmp_path / "pool", dm_name("pool")
    P = ["--pool", directory]
    ok(run("pool", "create", name, "--loop", directory, "--data-size", "64M"))
    ok(run("thin", "create", "vol", "16M", *P))
    db = sqlite3.connect(directory / "state.db")
    try:
        saved = db.execute(f"SELECT {column} FROM pool WHERE id = 1").fetchone()[0]
        with db:
            db.execute(f"UPDATE pool SET {column} = ? WHERE id = 1", (corrupt,))
        for what, args in (
            ("thin ls", ["thin", "ls"]),
            ("thin ls", ["thin", "ls", "--json"]),
            ("pool info", ["pool", "info"]),
            ("pool status", ["pool", "status"]),
            ("thin create x", ["thin", "create", "x", "8M"]),
        ):
            failed(run(*args, *P), 1, f"libdm: {what}: ", "state.db", "[EUCLEAN]")
        failed(sh("thin", "ls", *P), 1, "libdm: thin ls: ", "state.db", "[EUCLEAN]")
        assert f"{name}-x" not in witness.names()
    finally:
        with db:
            db.execute(f"UPDATE pool SET {column} = ? WHERE id = 1", (saved,))
        db.close()
    ok(run("pool", "destroy", "--remove-files", *P))


@kernel
def test_a_pool_comes_back_with_pool_open(dm_name, tmp_path):
    directory, name = tmp_path / "pool", dm_name("pool")
    env = {"LIBDM_POOL": str(directory)}
    ok(sh("pool", "create", name, "--loop", directory, "--data-size", "64M"))
    ok(sh("thin", "create", "vol", "16M", env=env))
    ok(sh("thin", "create", "off", "16M", env=env))
    ok(sh("thin", "deactivate", "off", env=env))

    def shape(n):  # the table without the device numbers, which may change
        fields = witness.table(n)[0].split()
        return fields[:3] + fields[5:] if fields[2] == "thin-pool" else fields[:3] + fields[4:]

    tables = {n: shape(n) for n in (name, f"{name}-vol")}
    ok(sh("pool", "destroy", env=env))
    assert not {name, f"{name}-vol"} & witness.names()
    failed(sh("pool", "info", env=env), 1, "is not active", f"libdm pool open {directory}")
    failed(sh("thin", "create", "x", "8M", env=env), 1, "is not active")
    rows = as_json(sh("thin", "ls", "--json", env=env))
    assert [(r["name"], r["active"]) for r in rows] == [("off", False), ("vol", False)]
    # Lazily: the pool only; vol comes up when first used.
    r = ok(sh("pool", "open", "--lazy", directory))
    assert r.out == f"pool {name} is active at /dev/mapper/{name}: 2 devices, 0 active\n"
    assert name in witness.names() and f"{name}-vol" not in witness.names()
    ok(sh("pool", "destroy", env=env))
    r = ok(sh("pool", "open", directory))
    assert r.out == f"pool {name} is active at /dev/mapper/{name}: 2 devices, 1 active\n"
    assert {n: shape(n) for n in tables} == tables
    assert f"{name}-off" not in witness.names()
    ok(run("pool", "open", directory))  # idempotent on a live pool
    ok(run("pool", "destroy", "--remove-files", "--pool", directory))


@kernel
def test_block_pools_on_two_devices_and_on_one_split(dm_name, tmp_path):
    data, meta = attach(tmp_path, "data.img", 128 * MiB), attach(tmp_path, "meta.img", 8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", meta], check=True, capture_output=True)
    name, state = dm_name("pool"), tmp_path / "state"
    failed(
        run("pool", "create", name, "--data", data, "--metadata", meta, "--state-dir", state),
        1,
        f"pool create {name}:",
        "ext2/ext3/ext4",
        "--force uses it anyway",
        "[ENOTEMPTY]",
    )
    assert name not in witness.names()
    ok(
        run(
            "pool",
            "create",
            name,
            "--data",
            data,
            "--metadata",
            meta,
            "--state-dir",
            state,
            "--force",
        )
    )
    fields = witness.table(name)[0].split()
    assert devno(meta) in below(fields[3]) and devno(data) in below(fields[4])
    ok(run("thin", "create", "vol", "32M", "--pool", state))
    assert witness.thin_ids(name) == {
        row["thin_id"] for row in as_json(run("thin", "ls", "--json", "--pool", state))
    }
    failed(run("pool", "resize", "1G", "--pool", state), 1, "pool resize:", "block devices")
    ok(run("pool", "destroy", "--remove-files", "--pool", state))
    assert not {name, f"{name}-vol"} & witness.names()

    disk = attach(tmp_path, "disk.img", 256 * MiB)
    split, split_state = dm_name("split"), tmp_path / "split"
    ok(
        run(
            "pool",
            "create",
            split,
            "--device",
            disk,
            "--state-dir",
            split_state,
            "--thinp-percent",
            "80",
            "--thinp-metapercent",
            "2",
        )
    )
    assert {f"{split}-tmeta", f"{split}-tdata", split} <= witness.names()
    tdata = witness.table(f"{split}-tdata")[0].split()
    assert tdata[2] == "linear" and tdata[3] == devno(disk)
    assert int(tdata[1]) == 256 * MiB // 512 * 80 // 100 // 128 * 128
    ok(run("thin", "create", "vol", "32M", "--pool", split_state))
    forest = as_json(run("ls", "--tree", "--json", "--pool", split_state))
    thin = next(n for n in forest if n["name"] == f"{split}-vol")
    assert thin["pool"]["role"] == "thin" and thin["pool"]["device"] == "vol"
    pool_node = thin["deps"][0]
    assert pool_node["name"] == split and pool_node["pool"]["role"] == "pool"
    assert sorted(d["name"] for d in pool_node["deps"]) == sorted(
        [f"{split}-tdata", f"{split}-tmeta"]
    )
    assert pool_node["deps"][0]["deps"][0]["name"] == os.path.basename(disk)
    ok(run("pool", "destroy", "--remove-files", "--pool", split_state))
    assert not {split, f"{split}-tmeta", f"{split}-tdata"} & witness.names()


@kernel
def test_pool_extend_onto_another_device(dm_name, tmp_path):
    data, meta = attach(tmp_path, "data.img", 64 * MiB), attach(tmp_path, "meta.img", 8 * MiB)
    spare = attach(tmp_path, "spare.img", 64 * MiB)
    name, state = dm_name("pool"), tmp_path / "state"
    P = ["--pool", state]
    ok(run("pool", "create", name, "--data", data, "--metadata", meta, "--state-dir", state))
    before = int(witness.table(name)[0].split()[1])
    failed(run("pool", "extend", tmp_path / "absent", *P), 1, "pool extend")
    ok(run("pool", "extend", spare, *P))
    # A refusal for the pool's state, not for the arguments: exit 1.
    failed(run("pool", "extend", spare, *P), 1, "already part of pool")
    after = int(witness.table(name)[0].split()[1])
    assert after > before and after * 512 >= 120 * MiB
    st = as_json(run("pool", "status", "--json", *P))
    assert st["line"] == " ".join(witness.pool_status(name))
    assert st["total_data_bytes"] == after * 512
    # Metadata from a region of another device.
    spare2 = attach(tmp_path, "spare2.img", 16 * MiB)
    ok(run("pool", "extend", spare2, "--metadata", "--start", "4M", "--length", "4M", *P))
    assert witness.table(f"{name}-tmeta")[1].split()[1:] == [
        str(4 * MiB // 512),
        "linear",
        devno(spare2),
        str(4 * MiB // 512),
    ]
    spare3 = attach(tmp_path, "spare3.img", 16 * MiB)
    failed(run("pool", "extend", spare3, "--start", "64M", *P), 2, "does not fit")
    # The last device grown outside libdm, picked up by refresh (the first
    # one was pinned to its length when the second was added).
    with open(tmp_path / "spare.img", "r+b") as fh:
        fh.truncate(96 * MiB)
    subprocess.run(["losetup", "-c", spare], check=True)
    ok(run("pool", "refresh", *P))
    # All of it but the first MiB, which holds the pool's label.
    assert witness.table(f"{name}-tdata")[1].split()[1] == str(95 * MiB // 512)
    ok(run("pool", "destroy", "--remove-files", *P))


@kernel
def test_monitor_grows_a_filling_pool(dm_name, tmp_path):
    directory, name = tmp_path / "pool", dm_name("pool")
    P = ["--pool", directory]
    ok(
        run(
            "pool",
            "create",
            name,
            "--loop",
            directory,
            "--data-size",
            "64M",
            "--min-free-space",
            "0",
            "--feature",
            "error_if_no_space",
        )
    )
    path = ok(run("thin", "create", "vol", "128M", *P)).out.strip()
    fill(path, 56)  # 87.5% of the data
    r = ok(
        run(
            "pool",
            "monitor",
            "--iterations",
            "1",
            "--interval",
            "0.2",
            "--percent",
            "50",
            "--max-data-size",
            "1G",
            "--reserve",
            "1M",
            *P,
        )
    )
    assert "grown from 64 MiB to 96 MiB" in r.err and "1 growth steps, 0 failed" in r.err
    assert witness.table(name)[0].split()[1] == str(96 << 11)
    failed(run("pool", "monitor", "--threshold", "150", *P), 2, "not a percentage")
    ok(run("pool", "destroy", "--remove-files", *P))


@kernel
def test_monitor_stops_cleanly_on_sigterm_and_sigint(dm_name, tmp_path):
    directory, name = tmp_path / "pool", dm_name("pool")
    ok(run("pool", "create", name, "--loop", directory, "--data-size", "64M"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "libdm",
                "pool",
                "monitor",
                "--interval",
                "0.5",
                "--pool",
                str(directory),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            first = proc.stderr.readline()
            assert "watching" in first, first
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert out == ""
        assert f"{signal.Signals(signum).name} received" in err
        assert "stopped; 0 growth steps, 0 failed" in err and "Traceback" not in err
    # The low water mark it set is in the live table.
    assert witness.table(name)[0].split()[6] == str(1024 * 20 // 100)
    ok(run("pool", "destroy", "--remove-files", "--pool", directory))


@kernel
def test_thin_resize_pool_set_and_trim(dm_name, tmp_path, cli_run):
    directory = tmp_path / "pool"
    ok(cli_run("pool", "create", dm_name("pool"), "--loop", directory, "--data-size", "256M"))
    ok(
        cli_run(
            "pool", "set", "--base-size", "32M", "--discard-on-delete", "on", "--pool", directory
        )
    )
    path = ok(cli_run("thin", "create", "vol", "--pool", directory)).out.strip()
    dm = os.path.basename(path)
    assert witness.table(dm)[0].split()[1] == str(32 * MiB // 512)
    assert (
        ok(cli_run("thin", "resize", "vol", "64M", "--pool", directory)).out.strip()
        == "vol: 64 MiB"
    )
    assert witness.table(dm)[0].split()[1] == str(64 * MiB // 512)
    failed(cli_run("thin", "resize", "vol", "16M", "--pool", directory), 2, "force")
    ok(cli_run("thin", "resize", "vol", "16M", "--force", "--pool", directory))
    assert witness.table(dm)[0].split()[1] == str(16 * MiB // 512)
    assert "trimmed" in ok(cli_run("pool", "trim", "--pool", directory)).out
    failed(cli_run("pool", "set", "--pool", directory), 2, "--base-size")


@kernel
def test_a_busy_thin_device_names_the_pool_setting_that_defers_it(dm_name, tmp_path):
    # A device still busy after the retries: libdm remove has --deferred for
    # that, but thin deactivate and thin delete have not, so their error
    # must not tell the user to pass it; it names the pool's setting.
    directory, name = tmp_path / "pool", dm_name("pool")
    P = ["--pool", directory]
    ok(
        run(
            "pool",
            "create",
            name,
            "--loop",
            directory,
            "--data-size",
            "64M",
            "--no-deferred-removal",
            "--no-deferred-deletion",
        )
    )
    ok(run("thin", "create", "vol", "16M", *P))
    fd = os.open(f"/dev/mapper/{name}-vol", os.O_RDONLY)
    try:
        for verb in ("deactivate", "delete"):
            line = failed(run("thin", verb, "vol", *P), 1, f"thin {verb} vol:", "[EBUSY]")
            assert "still busy after" in line and "--deferred " not in line, line
            assert f"libdm pool set --pool {directory} --deferred-removal on" in line, line
    finally:
        os.close(fd)
    assert f"{name}-vol" in witness.names()
    ok(run("thin", "delete", "vol", *P))
    ok(run("pool", "destroy", "--remove-files", *P))


@kernel
def test_open_from_the_environment_adopt_and_deferred_flags(
    dm_name, tmp_path, cli_run, monkeypatch
):
    directory = tmp_path / "pool"
    name = dm_name("pool")
    ok(
        cli_run(
            "pool",
            "create",
            name,
            "--loop",
            directory,
            "--data-size",
            "64M",
            "--no-deferred-removal",
            "--no-deferred-deletion",
        )
    )
    info = as_json(cli_run("pool", "info", "--json", "--pool", directory))
    assert info["Deferred Removal Enabled"] == info["Deferred Deletion Enabled"] == "false"
    ok(cli_run("pool", "set", "--deferred-removal", "on", "--pool", directory))
    info = as_json(cli_run("pool", "info", "--json", "--pool", directory))
    assert info["Deferred Removal Enabled"] == "true"
    ok(cli_run("thin", "create", "vol", "4M", "--pool", directory))
    witness.dmsetup("remove", f"{name}-vol")
    # pool open takes the directory from LIBDM_POOL, as every pool command.
    monkeypatch.setenv("LIBDM_POOL", str(directory))
    out = ok(
        cli_run("pool", "open")
        if cli_run is run
        else sh("pool", "open", env={"LIBDM_POOL": str(directory)})
    ).out
    assert "1 devices, 1 active" in out and witness.info(f"{name}-vol") is not None

    data = attach(tmp_path, "data.img", 64 * MiB)
    meta = attach(tmp_path, "meta.img", 4 * MiB)
    with open(meta, "r+b") as fh:
        fh.write(bytes(4096))
    other = dm_name("other")
    witness.dmsetup(
        "create",
        other,
        "--table",
        f"0 {64 * MiB // 512} thin-pool {devno(meta)} {devno(data)} 128 0",
    )
    state = tmp_path / "adopted"
    assert (
        ok(
            cli_run("pool", "adopt", other, "--state-dir", state, "--no-deferred-deletion")
        ).out.strip()
        == f"/dev/mapper/{other}"
    )
    monkeypatch.delenv("LIBDM_POOL")
    info = as_json(cli_run("pool", "info", "--json", "--pool", state))
    assert info["Pool Name"] == other and info["Deferred Deletion Enabled"] == "false"
    ok(cli_run("pool", "destroy", "--pool", state))
    assert witness.info(other) is not None  # adopted: not libdm's to remove
    witness.dmsetup("remove", other)


@kernel
def test_pool_open_counts_devices_on_a_terminal(dm_name, tmp_path, monkeypatch):
    directory = tmp_path / "pool"
    ok(run("pool", "create", dm_name("pool"), "--loop", directory, "--data-size", "64M"))
    for n in range(3):
        ok(run("thin", "create", f"v{n}", "4M", "--pool", directory))
    seen = []
    libdm.Pool.open(directory, progress=lambda done, total: seen.append((done, total))).close()
    assert seen == [(1, 3), (2, 3), (3, 3)]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = cli.main(["pool", "open", str(directory)])
    assert code == 0 and terminal.getvalue().endswith("activating devices: 3/3\n")
    # Growing a pool shows each step and its time.
    code = cli.main(["pool", "resize", "128M", "--metadata-size", "4M", "--pool", str(directory)])
    steps = terminal.getvalue().splitlines()[-2:]
    assert (
        code == 0
        and steps[0].startswith("growing the metadata of pool ")
        and steps[1].startswith("growing the data of pool ")
        and all(" done in " in step for step in steps)
    ), steps
    monkeypatch.undo()
    # Not on a terminal: nothing but the result.
    assert "activating" not in sh("pool", "open", directory).err
