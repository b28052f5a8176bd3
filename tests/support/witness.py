"""Independent witnesses of kernel state: dmsetup and sysfs.

Tests check what libdm did against these, never against libdm itself.
(Tests may run dmsetup; the library never does.)
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterable, Mapping
from typing import Any, Required, TypedDict

StrPath = str | os.PathLike[str]


class DeviceInfo(TypedDict):
    """One device as ``dmsetup info -c`` shows it."""

    name: str
    uuid: str
    major: int
    minor: int
    attr: str  # e.g. "L--w": live table, not suspended, writable
    open: int
    segments: int
    events: int


class PoolTable(TypedDict):
    """A ``thin-pool`` table line, parsed."""

    length: int
    meta: str
    data: str
    block_size: int
    low_water_mark: int
    features: list[str]


class PoolStatus(TypedDict, total=False):
    """A ``thin-pool`` status line, parsed; only ``failed`` when it failed."""

    failed: Required[str | None]
    txid: int
    used_meta: int
    total_meta: int
    used_data: int
    total_data: int
    mode: str
    needs_check: bool


class KernelSnapshot(TypedDict):
    """Every device's info, table lines and status lines, by name."""

    infos: dict[str, DeviceInfo]
    tables: dict[str, list[str]]
    statuses: dict[str, list[str]]


class StoreState(TypedDict):
    """What a pool's state store holds: its rows as SQLite reads them, by column."""

    pool: Any
    devices: list[Any]
    intents: list[Any]
    deferred: list[Any]
    foreign: Iterable[int]
    txid: int


def dmsetup(*args: str, check: bool = True) -> str:
    """Run dmsetup and return its stdout."""
    proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"dmsetup {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def table(name: str, *, inactive: bool = False) -> list[str]:
    """The device's table lines, as dmsetup prints them (its inactive
    table's with ``inactive``)."""
    args = ("table", "--inactive", name) if inactive else ("table", name)
    return [line.rstrip() for line in dmsetup(*args).splitlines()]


def status(name: str) -> list[str]:
    return [line.rstrip() for line in dmsetup("status", name).splitlines()]


def info(name: str) -> DeviceInfo | None:
    """dmsetup's view of one device as a dict, or None if it does not exist."""
    out = dmsetup(
        "info",
        "-c",
        "--noheadings",
        "--separator",
        "|",
        "-o",
        "name,uuid,major,minor,attr,open,segments,events",
        name,
        check=False,
    ).strip()
    if not out or "|" not in out:
        return None
    name_, uuid, major, minor, attr, open_, segments, events = out.split("|")
    return {
        "name": name_,
        "uuid": uuid,
        "major": int(major),
        "minor": int(minor),
        "attr": attr,
        "open": int(open_),
        "segments": int(segments),
        "events": int(events),
    }


def names() -> set[str]:
    """Names of all device-mapper devices, per dmsetup."""
    out = dmsetup("ls").strip()
    if not out or out == "No devices found":
        return set()
    return {line.split()[0] for line in out.splitlines()}


def sysfs(name: str, attr: str) -> str | None:
    """Read /sys/block/dm-N/dm/<attr> for device ``name`` (found by scanning)."""
    for entry in os.listdir("/sys/block"):
        if not entry.startswith("dm-"):
            continue
        base = f"/sys/block/{entry}/dm"
        with open(f"{base}/name") as fh:
            if fh.read().strip() == name:
                with open(f"{base}/{attr}") as fh2:
                    return fh2.read().strip()
    return None


def sysfs_names() -> set[str]:
    """Names of all device-mapper devices, per sysfs."""
    out = set()
    for entry in os.listdir("/sys/block"):
        if entry.startswith("dm-"):
            with open(f"/sys/block/{entry}/dm/name") as fh:
                out.add(fh.read().strip())
    return out


def devnode(devno: str) -> str:
    """/dev path of a block device given as 'major:minor' (via sysfs)."""
    with open(f"/sys/dev/block/{devno}/uevent") as fh:
        for line in fh:
            if line.startswith("DEVNAME="):
                return "/dev/" + line.split("=", 1)[1].strip()
    raise AssertionError(f"no device node for {devno}")


def pool_devices(pool_name: str) -> tuple[str, str]:
    """(metadata dev path, data dev path) from the pool's live table."""
    params = table(pool_name)[0].split()
    return devnode(params[3]), devnode(params[4])


def thin_ids(pool_name: str, meta: str | None = None) -> set[int]:
    """The thin device ids the pool's metadata holds, read by thin_dump from
    a metadata snapshot reserved here (not by libdm).  ``meta``: the
    metadata device's path, when the caller knows it."""
    import re

    if meta is None:
        meta, _ = pool_devices(pool_name)
    dmsetup("message", pool_name, "0", "reserve_metadata_snap")
    try:
        out = subprocess.run(
            ["thin_dump", "-m", meta], capture_output=True, text=True, check=True
        ).stdout
    finally:
        dmsetup("message", pool_name, "0", "release_metadata_snap")
    return {int(m) for m in re.findall(r'<device dev_id="(\d+)"', out)}


def pool_status(pool_name: str) -> list[str]:
    """The pool's status fields as dmsetup prints them (after the target type)."""
    return status(pool_name)[0].split()[3:]


def transaction_id(pool_name: str) -> int:
    return int(pool_status(pool_name)[0])


def checksum(path: StrPath, size: int | None = None) -> str:
    """SHA-256 of the first ``size`` bytes (all, when None) of ``path``."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        remaining = size
        while True:
            chunk = fh.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()


# -- every device at once, and the pool-level invariants ----------------------
#
# One dmsetup call for all devices instead of one per device: the checks
# below run after every step of the stateful test.

READ_TIMEOUT = 30.0  # seconds a 4 KiB read may take before the pool counts as wedged
MAX_METADATA_BLOCKS = 255 * (1 << 14)  # the kernel uses at most this many 4 KiB blocks


class PoolWedged(AssertionError):
    """I/O to a pool's device did not finish within the time limit."""


def _per_device(command: str) -> dict[str, list[str]]:
    """``dmsetup table`` / ``status`` of every device: name -> its lines."""
    out = dmsetup(command)
    result: dict[str, list[str]] = {}
    if out.strip() == "No devices found":
        return result
    for line in out.splitlines():
        if not line.strip():
            continue
        name, sep, rest = line.partition(": ")
        if not sep:  # a device with an empty table prints "name:"
            result.setdefault(line.rstrip().rstrip(":"), [])
            continue
        result.setdefault(name, []).append(rest.strip())
    return result


def tables() -> dict[str, list[str]]:
    """Every device's table lines, from one ``dmsetup table``."""
    return _per_device("table")


def statuses() -> dict[str, list[str]]:
    """Every device's status lines, from one ``dmsetup status``."""
    return _per_device("status")


def infos() -> dict[str, DeviceInfo]:
    """Every device's ``dmsetup info`` columns: name -> dict (see :func:`info`)."""
    out = dmsetup(
        "info",
        "-c",
        "--noheadings",
        "--separator",
        "|",
        "-o",
        "name,uuid,major,minor,attr,open,segments,events",
    ).strip()
    result: dict[str, DeviceInfo] = {}
    if not out or "|" not in out:
        return result
    for line in out.splitlines():
        name_, uuid, major, minor, attr, open_, segments, events = line.split("|")
        result[name_] = {
            "name": name_,
            "uuid": uuid,
            "major": int(major),
            "minor": int(minor),
            "attr": attr,
            "open": int(open_),
            "segments": int(segments),
            "events": int(events),
        }
    return result


def read_direct(
    path: StrPath, offset: int = 0, length: int = 4096, timeout: float = READ_TIMEOUT
) -> bytes:
    """Read ``length`` bytes at ``offset`` of a block device with O_DIRECT
    (past the page cache), in a thread given ``timeout`` seconds.

    Raises:
        PoolWedged: the read did not finish in time (the thread is left
            behind: I/O in the kernel cannot be cancelled).
        OSError: the read failed.
    """
    import mmap
    import threading

    data: list[bytes] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            try:
                buf = mmap.mmap(-1, length)  # page aligned, as O_DIRECT wants
                got = os.preadv(fd, [buf], offset)
                data.append(bytes(buf[:got]))
            finally:
                os.close(fd)
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True, name=f"read {path}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise PoolWedged(
            f"pool wedged: reading {length} bytes at {offset} of {path} did not "
            f"finish within {timeout:g} s"
        )
    if error:
        raise error[0]
    return data[0]


def write_direct(path: StrPath, offset: int, data: bytes, timeout: float = READ_TIMEOUT) -> None:
    """Write ``data`` (a multiple of 4 KiB) at ``offset`` with O_DIRECT and
    fsync, in a thread given ``timeout`` seconds (PoolWedged otherwise)."""
    import mmap
    import threading

    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            try:
                buf = mmap.mmap(-1, len(data))
                buf[:] = data
                done = os.pwritev(fd, [buf], offset)
                if done != len(data):
                    raise OSError(f"short write: {done} of {len(data)} bytes")
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True, name=f"write {path}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise PoolWedged(
            f"pool wedged: writing {len(data)} bytes at {offset} of {path} did "
            f"not finish within {timeout:g} s"
        )
    if error:
        raise error[0]


def store_state(directory: StrPath) -> StoreState:
    """What the pool's state store holds, read (never written) with
    sqlite3 itself, not libdm's Store: ``pool`` (its row, config decoded),
    ``devices``, ``intents``, ``deferred`` (rows as dicts by column),
    ``foreign`` and ``txid``."""
    path = os.path.join(os.fspath(directory), "state.db")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row

    def rows(sql: str) -> list[dict[str, Any]]:
        return [dict(row) for row in db.execute(sql)]

    try:
        db.execute("BEGIN")  # one read transaction: one consistent state
        pool = dict(db.execute("SELECT * FROM pool WHERE id = 1").fetchone())
        pool["config"] = json.loads(pool["config"])
        return {
            "pool": pool,
            "devices": rows("SELECT * FROM devices ORDER BY name"),
            "intents": rows("SELECT * FROM intents ORDER BY txid"),
            "deferred": rows("SELECT * FROM deferred_deletes ORDER BY thin_id"),
            "foreign": [r[0] for r in db.execute("SELECT thin_id FROM foreign_ids ORDER BY 1")],
            "txid": int(pool["transaction_id"]),
        }
    finally:
        db.close()


def _sysfs_dev(devno: str, attr: str) -> str | None:
    try:
        with open(f"/sys/dev/block/{devno}/{attr}") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _sysfs_sectors(devno: str) -> int:
    size = _sysfs_dev(devno, "size")
    if size is None:
        raise AssertionError(f"no size in sysfs for block device {devno}")
    return int(size)


def _device_sectors(path: StrPath) -> int:
    st = os.stat(path)
    return _sysfs_sectors(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")


def parse_pool_table(line: str) -> PoolTable:
    """``0 LEN thin-pool META DATA BS LWM N feat...`` -> dict."""
    f = line.split()
    count = int(f[7])
    return {
        "length": int(f[1]),
        "meta": f[3],
        "data": f[4],
        "block_size": int(f[5]),
        "low_water_mark": int(f[6]),
        "features": sorted(f[8 : 8 + count]),
    }


def parse_pool_status(line: str) -> PoolStatus:
    """``0 LEN thin-pool TXID UM/TM UD/TD HELD MODE DISCARD QUEUE NEEDS_CHECK ...``
    -> dict, or ``{"failed": word}`` for Fail / Error."""
    f = line.split()
    if len(f) < 11 or f[3] in ("Fail", "Error"):
        return {"failed": f[3] if len(f) > 3 else "?"}
    um, tm = (int(x) for x in f[4].split("/"))
    ud, td = (int(x) for x in f[5].split("/"))
    return {
        "failed": None,
        "txid": int(f[3]),
        "used_meta": um,
        "total_meta": tm,
        "used_data": ud,
        "total_data": td,
        "mode": f[7],
        "needs_check": f[10] == "needs_check",
    }


def kernel_snapshot() -> KernelSnapshot:
    """Every device's info, table and status (three dmsetup calls), to
    hand to :func:`pool_problems` and :func:`pool_disagreements`."""
    return {"infos": infos(), "tables": tables(), "statuses": statuses()}


def pool_problems(
    directory: StrPath | Any,
    *,
    read_timeout: float = READ_TIMEOUT,
    allow_read_only: bool = False,
    allow_full: bool = False,
    snapshot: KernelSnapshot | None = None,
) -> list[str]:
    """Everything wrong with the pool at ``directory`` (a path or a Pool),
    as readable strings, checked against dmsetup, sysfs and stat:

    * the pool device is live, not suspended (sysfs and dmsetup agree), and
      has no inactive table waiting;
    * it has not failed, is not read-only and has no needs_check flag
      (unless ``allow_read_only``), and is not out of data space (unless
      ``allow_full``);
    * its table matches the stored configuration: block size, low water
      mark, features, and a data length of exactly the whole data blocks
      of its data device (a loop pool: of its data file; a block pool: of
      ``-tdata``, itself the stored segments), metadata as large as the
      metadata device;
    * a loop pool's loop devices are over its own files, with their
      capacity equal to the file sizes, and the files are at least as
      large as the table and equal to the stored sizes;
    * every device the store records as active is live and resumed, with
      the table the store implies, and its first 4 KiB read with O_DIRECT
      within ``read_timeout`` seconds.

    ``snapshot`` is a :func:`kernel_snapshot` taken after the last change
    (one is taken when it is None).

    Raises:
        PoolWedged: a read did not finish in time; its message also names
            the problems found before it.
    """
    directory = getattr(directory, "directory", directory)
    problems = []
    state = store_state(directory)
    row, config = state["pool"], state["pool"]["config"]
    name = row["name"]
    snap = snapshot if snapshot is not None else kernel_snapshot()
    info_all, table_all, status_all = snap["infos"], snap["tables"], snap["statuses"]
    pinfo = info_all.get(name)
    if pinfo is None or not table_all.get(name):
        return [f"pool device {name} is not live"]
    attr = pinfo["attr"]
    suspended = attr[2:3] == "s" or sysfs(name, "suspended") == "1"
    if suspended:
        problems.append(
            f"pool {name} is suspended (dmsetup attr {attr}, sysfs "
            f"suspended={sysfs(name, 'suspended')})"
        )
    if attr[1:2] == "I":
        problems.append(
            f"pool {name} has an inactive table loaded (dmsetup attr {attr}): "
            f"a reload was never resumed or cleared"
        )
    if attr[0:1] != "L":
        problems.append(f"pool {name} has no live table (dmsetup attr {attr})")
    st = parse_pool_status(status_all[name][0])
    if st["failed"]:
        problems.append(f"pool {name} has failed: status {status_all[name][0]}")
        return problems
    if not allow_read_only:
        if st["mode"] == "ro":
            problems.append(f"pool {name} is read-only: {status_all[name][0]}")
        if st["needs_check"]:
            problems.append(f"pool {name} has needs_check set: {status_all[name][0]}")
    if st["mode"] == "out_of_data_space" and not allow_full:
        problems.append(f"pool {name} is out of data space: {status_all[name][0]}")
    tab = parse_pool_table(table_all[name][0])
    bs = config["block_size"]
    if tab["block_size"] != bs:
        problems.append(f"pool {name}: table block size {tab['block_size']}, stored {bs}")
    if tab["low_water_mark"] != config["low_water_mark"]:
        problems.append(
            f"pool {name}: table low water mark {tab['low_water_mark']}, "
            f"stored {config['low_water_mark']}"
        )
    if tab["features"] != sorted(config["features"]):
        problems.append(
            f"pool {name}: table features {tab['features']}, stored {sorted(config['features'])}"
        )
    if st["total_data"] * bs != tab["length"]:
        problems.append(
            f"pool {name}: the kernel counts {st['total_data']} data blocks, "
            f"the table is {tab['length']} sectors long"
        )
    if row["kind"] == "loop":
        problems += _loop_problems(directory, name, config, tab, st)
    elif row["kind"] == "block":
        problems += _block_problems(name, config, tab, st, info_all, table_all)
    pool_devno = f"{pinfo['major']}:{pinfo['minor']}"
    readable = []
    for dev in state["devices"]:
        if not dev["active"]:
            continue
        dm_name = f"{name}-{dev['name']}"
        dinfo = info_all.get(dm_name)
        if dinfo is None:
            problems.append(f"{dev['name']} is recorded active but {dm_name} is not live")
            continue
        if dinfo["attr"][2:3] == "s" or sysfs(dm_name, "suspended") == "1":
            problems.append(f"{dm_name} is suspended (dmsetup attr {dinfo['attr']})")
            continue
        if dinfo["attr"][1:2] == "I":
            problems.append(f"{dm_name} has an inactive table loaded")
        want = f"0 {dev['size']} thin {pool_devno} {dev['thin_id']}"
        if table_all.get(dm_name) != [want]:
            problems.append(f"{dm_name}: table {table_all.get(dm_name)}, expected [{want!r}]")
            continue
        readable.append(dm_name)
    if suspended:
        return problems  # reading would only hang
    for dm_name in readable:
        try:
            read_direct(f"/dev/mapper/{dm_name}", 0, 4096, timeout=read_timeout)
        except PoolWedged as exc:
            raise PoolWedged("; ".join([*problems, str(exc)])) from None
        except OSError as exc:
            problems.append(f"reading {dm_name} failed: {exc}")
    return problems


def _loop_problems(
    directory: StrPath, name: str, config: Mapping[str, Any], tab: PoolTable, st: PoolStatus
) -> list[str]:
    problems = []
    bs = config["block_size"]
    files = {
        "data": os.path.join(directory, config.get("data_file", "data")),
        "metadata": os.path.join(directory, config.get("metadata_file", "metadata")),
    }
    sizes = {what: os.stat(path).st_size for what, path in files.items()}
    for what, devno in (("data", tab["data"]), ("metadata", tab["meta"])):
        backing = _sysfs_dev(devno, "loop/backing_file")
        if backing is None or os.path.realpath(backing) != os.path.realpath(files[what]):
            problems.append(
                f"pool {name}: its {what} device {devno} is over {backing}, not {files[what]}"
            )
            continue
        capacity = _sysfs_sectors(devno) * 512
        if capacity != sizes[what] // 512 * 512:
            problems.append(
                f"pool {name}: the {what} loop device {devno} holds {capacity} "
                f"bytes, its file {sizes[what]} (capacity not refreshed)"
            )
        stored = config.get(f"{what}_size")
        if stored != sizes[what]:
            problems.append(
                f"pool {name}: the stored {what}_size is {stored}, the {what} "
                f"file is {sizes[what]} bytes"
            )
    whole = sizes["data"] // 512 // bs * bs
    if tab["length"] != whole:
        problems.append(
            f"pool {name}: the table's data length is {tab['length']} sectors, "
            f"the data file holds {whole} sectors of whole data blocks "
            f"({sizes['data']} bytes)"
        )
    if sizes["data"] < tab["length"] * 512:
        problems.append(
            f"pool {name}: the data file ({sizes['data']} bytes) is smaller "
            f"than the table ({tab['length']} sectors)"
        )
    want_meta = min(sizes["metadata"] // 4096, MAX_METADATA_BLOCKS)
    if st["total_meta"] != want_meta:
        problems.append(
            f"pool {name}: the kernel uses {st['total_meta']} metadata blocks, "
            f"the metadata file holds {want_meta} ({sizes['metadata']} bytes)"
        )
    if sizes["metadata"] < st["total_meta"] * 4096:
        problems.append(
            f"pool {name}: the metadata file ({sizes['metadata']} bytes) is "
            f"smaller than the kernel's {st['total_meta']} metadata blocks"
        )
    return problems


def _segments_table(
    segments: Iterable[tuple[str, int, int | None]],
) -> tuple[list[str], int]:
    out: list[str] = []
    at = 0
    for path, start, length in segments:
        st = os.stat(path)
        devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        size = _sysfs_sectors(devno)
        if length is None:
            length = size - start
        out.append(f"{at} {length} linear {devno} {start}")
        at += length
    return out, at


def _block_problems(
    name: str,
    config: Mapping[str, Any],
    tab: PoolTable,
    st: PoolStatus,
    info_all: Mapping[str, DeviceInfo],
    table_all: Mapping[str, list[str]],
) -> list[str]:
    problems = []
    bs = config["block_size"]
    for what, piece, key, devno in (
        ("data", f"{name}-tdata", "data_segments", tab["data"]),
        ("metadata", f"{name}-tmeta", "meta_segments", tab["meta"]),
    ):
        pinfo = info_all.get(piece)
        if pinfo is None:
            problems.append(f"pool {name}: its {what} piece {piece} is not live")
            continue
        if f"{pinfo['major']}:{pinfo['minor']}" != devno:
            problems.append(f"pool {name}: the table's {what} device is {devno}, not {piece}")
        if pinfo["attr"][1:3] != "--":
            problems.append(
                f"{piece} is suspended or has an inactive table (dmsetup attr {pinfo['attr']})"
            )
        want, total = _segments_table(config[key])
        live = [" ".join(line.split()) for line in table_all.get(piece, [])]
        if live != want:
            problems.append(f"{piece}: table {live}, the stored segments give {want}")
        if what == "data" and tab["length"] != total // bs * bs:
            problems.append(
                f"pool {name}: the table's data length is {tab['length']} "
                f"sectors, the stored segments hold {total // bs * bs} sectors "
                f"of whole data blocks"
            )
        if what == "metadata" and st["total_meta"] != min(total // 8, MAX_METADATA_BLOCKS):
            problems.append(
                f"pool {name}: the kernel uses {st['total_meta']} metadata "
                f"blocks, the metadata segments hold {total // 8}"
            )
    return problems


def pool_disagreements(
    directory: StrPath | Any, snapshot: KernelSnapshot | None = None
) -> list[str]:
    """Every way the store, the kernel (dmsetup) and the on-disk thin ids
    (thin_dump of a reserved metadata snapshot) disagree: intents left
    over, transaction ids, leaked or phantom thin ids, active flags against
    live devices, live devices the store does not know."""
    directory = getattr(directory, "directory", directory)
    found = []
    state = store_state(directory)
    name = state["pool"]["name"]
    if state["intents"]:
        found.append(f"intents left in the store: {state['intents']}")
    snap = snapshot if snapshot is not None else kernel_snapshot()
    st = parse_pool_status(snap["statuses"][name][0])
    if st["failed"]:
        return [*found, f"pool {name} has failed"]
    if state["txid"] != st["txid"]:
        found.append(f"transaction id: store {state['txid']}, kernel {st['txid']}")
    recorded = {r["thin_id"] for r in state["devices"]}
    queued = {r["thin_id"] for r in state["deferred"]}
    on_disk = thin_ids(name, meta=devnode(parse_pool_table(snap["tables"][name][0])["meta"]))
    leaked = on_disk - recorded - queued - set(state["foreign"])
    phantom = (recorded | queued) - on_disk
    if leaked:
        found.append(f"leaked thin ids (on disk, not in the store) {sorted(leaked)}")
    if phantom:
        found.append(f"records without a thin id on disk {sorted(phantom)}")
    live = set(snap["infos"])
    known = set()
    for row in state["devices"]:
        dm_name = f"{name}-{row['name']}"
        known.add(dm_name)
        if bool(row["active"]) != (dm_name in live):
            found.append(
                f"{row['name']}: store active={row['active']} but {dm_name} is "
                f"{'live' if dm_name in live else 'absent'}"
            )
    pieces = {f"{name}-tdata", f"{name}-tmeta"}
    strays = {n for n in live if n.startswith(f"{name}-")} - known - pieces
    if strays:
        found.append(f"live devices the store does not record: {sorted(strays)}")
    return found


def assert_pool_healthy(directory: StrPath | Any, **options: Any) -> None:
    """Fail (AssertionError, or PoolWedged) unless :func:`pool_problems`
    finds nothing; same options."""
    problems = pool_problems(directory, **options)
    assert not problems, "unhealthy pool: " + "; ".join(problems)
