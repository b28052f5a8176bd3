"""A model-based, stateful test of pools in a crowded world, in the real kernel.

tests/test_stateful.py models one pool, reached through the library, in a
device-mapper namespace that holds nothing else.  Users live elsewhere.
Each example here builds a small host and runs random steps on it:

* **A crowded namespace.**  Two block pools whose names collide with
  each other's devices: pool ``P`` (devices such as ``b-x``) and pool
  ``P-b`` (devices such as ``x``), so ``P``'s ``b-x`` and ``P-b``'s ``x``
  are the same device-mapper name ``P-b-x``.  Beside them, what other
  programs made: a ``dmsetup create`` linear device ``P-y`` over a loop
  device, a zero device ``P-b-z``, a loop device of their own, files in
  the directory that holds the pools' state directories (one named
  ``state.db``, one ``lock``), and, at random steps, a linear device made
  by another program under the name of a pool's inactive device (a
  squatter; it goes away again at another random step).  After every
  step, everything that the pool that acted did not make is as it was:
  every other device-mapper device's presence, uuid, table and
  suspended flag (dmsetup), the contents of the other programs' devices
  and loop devices (SHA-256), the bytes, mode and owner of their files,
  the names in the state directories' parent, and every page written to
  the other pool's devices.
* **Every entry point.**  Each step goes, at random, through the library
  (a ``Pool`` kept open in this process for the whole example), the CLI
  (``python -m libdm`` in a subprocess), a fresh ``Pool.load`` in a
  subprocess (as the CLI loads a pool), or the monitor service
  (``libdm monitor serve`` watching the pool, in a subprocess).  A
  subprocess step may be killed: at a named crash point
  (``LIBDM_CRASH_AT``, see :mod:`libdm.thin.crash`) or by SIGKILL after
  a random delay.  Nothing runs ``Pool.open`` after a kill: the next step
  is a change through a random entry point, which must finish or undo
  what the kill left (or refuse, saying what to run); a listing
  (``thin ls``) may come first, and must show the pool as it will be
  once the kill is settled.
* **A hostile state filesystem.**  The state directories live on a small
  tmpfs mounted here.  At random steps it is filled by a ballast file
  (with the library's kept pools open, or with nobody else using the
  pools) or remounted read-only, one to three steps run, and the space
  is given back: each step either does what it should or raises a libdm
  error (a ``DMError``, never ``sqlite3.*``, ``KeyError`` or an
  ``OSError`` without a path) that says what happened (no space, or a
  read-only filesystem), a listing works on a full filesystem, and
  nothing is lost.  A failed step is settled like a kill.  Read-only
  needs the files this process holds open for writing closed, so the
  library's pools are closed for those steps (the library's steps then
  load the pool afresh) and loaded again after.  The pools' data and
  metadata are loop devices over files elsewhere: a full state
  filesystem must not fail the kernel's own I/O.

After every settled step each pool is checked against witnesses that are
not libdm (as in tests/test_stateful.py): the store read back, dmsetup
and sysfs (:func:`witness.pool_problems`), thin_dump of a reserved
metadata snapshot (after a change of thin ids: it costs seconds in the
test kernel), the plain-Python model (allowed outcomes: all or nothing of
the step), and every page written reads back.  A pool's devices are
told from others' by their uuids, never by their names.

The steps come from a seeded Random (``LIBDM_STATEFUL_SEED``, printed);
a failure lists the steps of its example as they ran.  The examples run
in a plain loop rather than hypothesis's state machine: every choice
comes from that Random, and a timed kill does not replay, so hypothesis
could neither shrink nor replay one.  The everyday run
does a reduced count; ``LIBDM_RELIABILITY=full`` (the reliability
report) does at least 2,000 steps and 200 kills, and records its figures
under "stateful world".  The scripted examples at the end run the same
machine through fixed steps: the shortest example of each defect class
it is meant to find.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
from support import reliability, witness

import libdm
from libdm.thin import crash

pytestmark = pytest.mark.kernel

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4 * KiB
BLOCK = 64 * KiB
DATA_SIZE = 64 * MiB
META_SIZE = 4 * MiB
STATE_FS_SIZE = 4 * MiB  # the tmpfs that holds the state directories
FOREIGN_SIZE = 512 * KiB  # the other program's loop device
FOREIGN_DM = 256  # sectors of each of its device-mapper devices
MAX_DEVICES = 5  # per pool
MAX_WRITES = 30  # per example
MAX_SQUATTERS = 2

TOTAL_STEPS = reliability.scale(20, 2000)
TOTAL_KILLS = reliability.scale(3, 200)
STEPS_PER_EXAMPLE = reliability.scale(20, 60)
MAX_EXAMPLES = 200
CHILD_TIMEOUT = 120.0  # a step that takes longer is hung: the pool is wedged

# The device names each pool draws from.  Pool P's "b-x" and "b-w" are
# pool P-b's "x" and "w" in device-mapper; P's "y" is the other program's
# linear device P-y, and P-b's "z" its zero device P-b-z.
NAMES = {"p": ("b-x", "b-w", "c", "d", "y", "e"), "pb": ("x", "w", "f", "g", "z", "h")}

# The changes drawn, and the named crash points each can reach.
POINTS_FOR = {
    "create_thin": ("create:intent", "create:message", "create:transaction", "create:recorded"),
    "snapshot": (
        "create:intent",
        "snapshot:suspended",
        "create:message",
        "create:transaction",
        "create:recorded",
    ),
    "delete": ("delete:intent", "delete:deactivated", "delete:message", "delete:transaction"),
    "resize_thin": ("resize_device:recorded",),
    "activate": (),
    "deactivate": (),
    "destroy": (),
    "open": (),
    "ls": (),
    "watch": (),
}
ENTRIES = ("library", "load", "cli", "monitor")
# What an error on a hostile state filesystem must say (a store called
# damaged, or a backup advised, when the filesystem is full misleads).
HOSTILE_WORDS = {
    "full": r"space|ENOSPC|full",
    "full-alone": r"space|ENOSPC|full",
    "read-only": r"read-only|EROFS",
}
THIN_ID_OPS = ("create_thin", "snapshot", "delete", "destroy", "open")

# One operation on a pool, run in this process on the kept Pool or in a
# child on a fresh Pool.load (the same source, so both make the same calls).
OPS_SOURCE = r'''
def apply(pool, op, a):
    """Run one operation; return something JSON can carry."""
    import libdm
    if op == "create_thin":
        pool.create_thin(a["name"], a["size"])
    elif op == "snapshot":
        pool.device(a["origin"]).snapshot(a["name"])
    elif op == "delete":
        pool.device(a["name"]).delete()
    elif op == "resize_thin":
        pool.device(a["name"]).resize(a["size"], force=True)
    elif op == "activate":
        pool.device(a["name"]).activate()
    elif op == "deactivate":
        pool.device(a["name"]).deactivate()
    elif op == "ls":
        return [[d.name, int(d.size), d.parent.name if d.parent is not None else None,
                 bool(d.active)] for d in pool.devices()]
    elif op == "destroy":
        pool.destroy()
    elif op == "open":
        libdm.Pool.open(a["directory"]).close()
    else:
        raise AssertionError(f"unknown operation {op!r}")
    return None


def describe(exc):
    """What a caller is told: the exception's class and whether it is libdm's."""
    import libdm
    return {"ok": False, "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "libdm": isinstance(exc, libdm.DMError),
            "filename": getattr(exc, "filename", None), "message": str(exc)}
'''

CHILD = (
    OPS_SOURCE
    + r"""
import json, sys, traceback
import libdm
req = json.loads(sys.argv[1])
pool = None
print("ready", flush=True)
sys.stdin.readline()
try:
    if req["op"] != "open":
        pool = libdm.Pool.load(req["args"]["directory"])
    out = {"ok": True, "value": apply(pool, req["op"], req["args"])}
except Exception as exc:
    out = describe(exc)
    out["where"] = traceback.format_exc().strip().splitlines()[-3:-1]
finally:
    if pool is not None and req["op"] != "destroy":
        pool.close()
print(json.dumps(out), flush=True)
"""
)

_ops: dict = {}
exec(OPS_SOURCE, _ops)
apply_op = _ops["apply"]
describe_exc = _ops["describe"]


class StepFailed(AssertionError):
    """A step's outcome or the world afterwards is wrong (the message says how)."""


# -- the model -----------------------------------------------------------------------


@dataclass
class Dev:
    size: int  # bytes
    parent: str | None
    active: bool
    pages: dict = field(default_factory=dict)  # 4 KiB page -> tag of its write


UNKNOWN = -1  # a page whose content the model does not know (not checked)


def pattern(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (PAGE // 8)


def describe_page(data: bytes) -> str:
    if data == bytes(PAGE):
        return "zeros"
    tag = int.from_bytes(data[:8], "little")
    if data == pattern(tag):
        return f"write #{tag}"
    return f"other bytes ({data[:16].hex()}...)"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class Outcome:
    """How an entry point answered: ``killed``, ``ok`` (with ``value``) or
    an error (``libdm``: one of libdm's own; ``usage``: a ValueError, or
    the CLI's exit status 2)."""

    killed: bool = False
    ok: bool = False
    value: object = None
    error: str = ""  # the exception's class, or the CLI's error line
    libdm: bool = False
    usage: bool = False
    text: str = ""  # for the log

    def short(self) -> str:
        if self.killed:
            return "KILLED"
        if self.ok:
            return "ok" + ("" if self.value is None else f" {_short(self.value)}")
        return f"error {self.error}: {_short(self.text, 400)}"


class Stats:
    def __init__(self):
        self.steps = 0
        self.kills = 0
        self.examples = 0
        self.ops = collections.Counter()
        self.entries = collections.Counter()
        self.killed_ops = collections.Counter()
        self.points = collections.Counter()
        self.hostile = collections.Counter()
        self.losses = 0
        self.disagreements = 0
        self.wedged = 0
        self.foreign_touched = 0
        self.bad_errors = 0
        self.failures: list[str] = []


CONTEXT: dict = {}  # dm_prefix, work directory, Stats, Random: set by the test


def _short(value, limit=300):
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) < limit else text[:limit] + "..."


def _run(*cmd, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _devno(path):
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _cli_exception(stderr: str) -> str | None:
    """The class of the exception the CLI's ``--debug`` traceback ends with."""
    blocks = stderr.split("Traceback (most recent call last):")
    if len(blocks) < 2:
        return None
    for line in blocks[-1].splitlines()[1:]:
        if line and not line.startswith(" "):
            return line.split(":", 1)[0].strip()
    return None


# -- one pool of the world ---------------------------------------------------------------


class WorldPool:
    def __init__(self, key, name, directory):
        self.key = key  # "p" or "pb"
        self.name = name
        self.directory = directory
        self.lib: libdm.Pool | None = None  # the library's kept Pool
        self.devices: dict[str, Dev] = {}
        self.token = ""
        self.uuid = ""

    def dm(self, dev: str) -> str:
        """The device-mapper name libdm gives device ``dev``."""
        if self.lib is not None:
            return self.lib.device_dm_name(dev)
        return f"{self.name}-{dev}"  # while the kept pool is closed

    def owns(self, name: str, snap: witness.KernelSnapshot) -> bool:
        """Whether device-mapper device ``name``, as ``snap`` shows it, is
        this pool's own: the pool device, the pieces under it, or a thin
        device over it, told by its table (whatever its name); while the
        pool device is down, by the uuids libdm gives them."""
        info = snap["infos"].get(name)
        if name == self.name or info is None:
            return name == self.name
        pinfo, lines = snap["infos"].get(self.name), snap["tables"].get(self.name, [])
        if pinfo is not None and len(lines) == 1 and " thin-pool " in lines[0]:
            table = witness.parse_pool_table(lines[0])
            devno = f"{info['major']}:{info['minor']}"
            if devno in (table["meta"], table["data"]):
                return True
            own = snap["tables"].get(name, [])
            pool_devno = f"{pinfo['major']}:{pinfo['minor']}"
            return len(own) == 1 and own[0].split()[2:4] == ["thin", pool_devno]
        uuid = info["uuid"]
        return name in (f"{self.name}-tdata", f"{self.name}-tmeta") or (
            bool(uuid) and (uuid == self.uuid or uuid.startswith(f"LIBDM-THIN-{self.token}-"))
        )


# -- the machine ---------------------------------------------------------------------------


class WorldMachine:
    """One example: a fresh crowded host with two pools, and steps on it."""

    def __init__(self):
        self.stats: Stats = CONTEXT["stats"]
        self.stats.examples += 1
        n = self.stats.examples
        print(
            f"[{time.strftime('%H:%M:%S')}] world example {n}: "
            f"{self.stats.steps} steps, {self.stats.kills} kills so far",
            flush=True,
        )
        self.rnd: random.Random = CONTEXT["rnd"]
        self.base = CONTEXT["workdir"] / f"w{n}"
        self.statefs = self.base / "state"  # the tmpfs: the pools' parent
        self.prefix = f"{CONTEXT['dm_prefix']}w{n}"
        self.pools: dict[str, WorldPool] = {}
        self.loops: list[str] = []  # every loop device made here
        self.foreign_dm: dict[str, dict] = {}  # other programs' devices
        self.foreign_loops: dict[str, tuple] = {}  # loop device -> (its file, size, sha)
        self.foreign_files: dict[str, tuple] = {}  # path -> (mode, uid, sha)
        self.parent_names: set[str] = set()
        self.squat_count = 0
        self.tag = n * 100000
        self.writes = 0
        self.counter = 0
        self.mounted = False
        self.ballast: str | None = None
        self.read_only = False
        self.kept_closed = False  # the library's kept pools closed for a step
        self.dump = False  # check thin ids with thin_dump at the next settle
        self.pending: tuple[str, list[dict], set] | None = None  # after a kill
        self.log: list[str] = []

    # -- building the world ----------------------------------------------------------

    def _losetup(self, path, size, content=None):
        with open(path, "wb") as fh:
            if content is None:
                fh.truncate(size)
            else:
                fh.write(content)
        dev = _run("losetup", "--find", "--show", str(path))
        self.loops.append(dev)
        return dev

    def build(self):
        os.makedirs(self.statefs)
        os.makedirs(self.base / "backing")
        os.makedirs(self.base / "other")
        _run(
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={STATE_FS_SIZE},mode=0755",
            "tmpfs",
            str(self.statefs),
        )
        self.mounted = True
        # What other programs made: files beside the state directories...
        files = {
            "state.db": (b"another program's database\n" * 40, 0o600),
            "lock": (b"12345\n", 0o640),
            "notes.txt": (b"keep me\n", 0o644),
            f"{self.prefix}p-b-x": (b"named like a device\n", 0o600),
        }
        for fname, (data, mode) in files.items():
            path = str(self.statefs / fname)
            with open(path, "wb") as fh:
                fh.write(data)
            os.chmod(path, mode)
        # ...a loop device over their own file, linear and zero devices named
        # like the pools' devices, and a second loop device.
        rnd = random.Random(self.prefix)
        disk = self._losetup(
            self.base / "other" / "disk", FOREIGN_SIZE, rnd.randbytes(FOREIGN_SIZE)
        )
        self.foreign_disk = disk
        self._foreign_loop(disk, self.base / "other" / "disk", FOREIGN_SIZE)
        spare = self._losetup(self.base / "other" / "spare", 128 * KiB, rnd.randbytes(128 * KiB))
        self._foreign_loop(spare, self.base / "other" / "spare", 128 * KiB)
        p, pb = f"{self.prefix}p", f"{self.prefix}p-b"
        self._foreign_create(
            f"{p}-y", f"0 {FOREIGN_DM} linear {_devno(disk)} 0", "OTHERPROG-linear-y"
        )
        self._foreign_create(f"{pb}-z", f"0 {FOREIGN_DM} zero", "OTHERPROG-zero-z")
        # The two pools, on loop devices over files outside the state filesystem.
        for key, name in (("p", p), ("pb", pb)):
            pool = WorldPool(key, name, str(self.statefs / name[len(self.prefix) :]))
            data = self._losetup(self.base / "backing" / f"{key}-data", DATA_SIZE)
            meta = self._losetup(self.base / "backing" / f"{key}-meta", META_SIZE)
            libdm.Pool.create(name, data, meta, state_dir=pool.directory, min_free_space=0).close()
            pool.lib = libdm.Pool.load(pool.directory)
            state = witness.store_state(pool.directory)
            pool.token = state["pool"]["config"]["token"]
            pool.uuid = state["pool"]["uuid"]
            self.pools[key] = pool
        # Which names the parent holds, and the other programs' files there.
        self.parent_names = set(os.listdir(self.statefs))
        for fname in files:
            path = str(self.statefs / fname)
            self.foreign_files[path] = self.file_facts(path)
        self.log.append(f"world: pools {p} and {pb}, foreign {sorted(self.foreign_dm)}")
        self.world = self.foreign_world()

    def _foreign_loop(self, dev, path, size):
        self.foreign_loops[dev] = (str(path), size, sha(witness.read_direct(dev, 0, size)))

    def _foreign_create(self, name, table, uuid, size=FOREIGN_DM * 512):
        witness.dmsetup("create", name, "--uuid", uuid, "--table", table)
        witness.dmsetup("mknodes", name)  # no udev in the test kernel
        self.foreign_dm[name] = {"uuid": uuid, "table": [table], "size": size}
        self.foreign_dm[name]["sha"] = sha(witness.read_direct(f"/dev/mapper/{name}", 0, size))

    @staticmethod
    def file_facts(path):
        st = os.lstat(path)
        with open(path, "rb") as fh:
            return (oct(st.st_mode), st.st_uid, sha(fh.read()))

    def teardown(self):
        with contextlib.suppress(Exception):
            self._give_back()
        for pool in self.pools.values():
            if pool.lib is not None:
                with contextlib.suppress(Exception):
                    pool.lib.close()
            with contextlib.suppress(Exception):
                libdm.Pool.load(pool.directory).destroy()
        # What is left (a wedged pool, the other programs' devices) the
        # test's cleanup removes by prefix; the loops and the mount here.
        from libdm.testing import cleanup

        with contextlib.suppress(Exception):
            cleanup.cleanup_devices(self.prefix)
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.statefs)], capture_output=True)
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)

    # -- the world outside a pool --------------------------------------------------------

    def foreign_world(self):
        """Everything the pools must leave alone, as it is now."""
        snap = witness.kernel_snapshot()
        dms = {
            name: (info["uuid"], tuple(snap["tables"].get(name, [])), info["attr"][2:3] == "s")
            for name, info in snap["infos"].items()
            if name.startswith(self.prefix)
        }
        return {"snap": snap, "dm": dms}

    def check_foreign(self, acting, before, what):
        """Nothing that the pool ``acting`` did not make changed in ``what``
        (dmsetup's view from ``before``), and the other programs' devices,
        loop devices and files are byte for byte as they were."""
        after = self.foreign_world()
        touched = []
        owner = self.pools.get(acting)
        for name in sorted(set(before["dm"]) | set(after["dm"])):
            old, new = before["dm"].get(name), after["dm"].get(name)
            info_old = before["snap"]["infos"].get(name)
            info_new = after["snap"]["infos"].get(name)
            seen = before["snap"] if old else after["snap"]
            # Whose it was before the step (or, new, after it): a device of
            # another pool that the step reloaded onto its own is not its own.
            if owner is not None and owner.owns(name, seen):
                continue
            if old != new:
                touched.append(
                    f"device {name} ({self._whose(info_old or info_new, name, seen)}): before "
                    f"{self._dm_text(old)}, after {self._dm_text(new)}"
                )
        for name, facts in sorted(self.foreign_dm.items()):
            if name not in after["dm"] or after["dm"][name][2]:
                continue  # gone or suspended: reported above
            try:
                got = sha(witness.read_direct(f"/dev/mapper/{name}", 0, facts["size"], timeout=10))
            except (OSError, witness.PoolWedged) as exc:
                got = f"unreadable ({exc})"
            if got != facts["sha"]:
                touched.append(
                    f"contents of {name} (another program's device): sha256 {facts['sha']} "
                    f"before, {got} after"
                )
        for dev, (path, size, digest) in sorted(self.foreign_loops.items()):
            backing = _sysfs_text(f"/sys/block/{os.path.basename(dev)}/loop/backing_file")
            if backing != path:
                touched.append(
                    f"loop device {dev} (another program's): over {backing}, was {path}"
                )
                continue
            try:
                got = sha(witness.read_direct(dev, 0, size, timeout=10))
            except (OSError, witness.PoolWedged) as exc:
                got = f"unreadable ({exc})"
            if got != digest:
                touched.append(
                    f"contents of loop device {dev} (another program's): sha256 {digest} "
                    f"before, {got} after"
                )
        for path, facts in sorted(self.foreign_files.items()):
            try:
                now = self.file_facts(path)
            except OSError as exc:
                now = f"gone ({exc})"
            if now != facts:
                touched.append(f"file {path} (another program's): {facts} before, {now} after")
        if self.mounted:
            names = set(os.listdir(self.statefs)) - {".ballast"}
            if names != self.parent_names:
                touched.append(
                    f"the pools' parent directory {self.statefs} holds {sorted(names)}, "
                    f"was {sorted(self.parent_names)}"
                )
        if touched:
            self.stats.foreign_touched += len(touched)
            self._fail(
                f"after {what}, {acting or 'nobody'} touched what it did not make:\n    "
                + "\n    ".join(touched)
            )
        return after

    def _whose(self, info, name, snap):
        for pool in self.pools.values():
            if pool.owns(name, snap):
                return f"pool {pool.name}'s"
        return "another program's" if info and info["uuid"].startswith("OTHERPROG") else "?"

    @staticmethod
    def _dm_text(facts):
        if facts is None:
            return "absent"
        uuid, table, suspended = facts
        return f"uuid {uuid!r} table {list(table)}{' SUSPENDED' if suspended else ''}"

    def _fail(self, message):
        self.stats.failures.append(message.splitlines()[0])
        raise StepFailed(
            message
            + f"\nsteps of this example (LIBDM_STATEFUL_SEED={CONTEXT.get('seed')}):\n  "
            + "\n  ".join(self.log)
        )

    # -- running one operation through one entry point ----------------------------------------

    def _library(self, pool, op, args):
        out = Outcome()

        def run():
            target = pool.lib
            try:
                if self.kept_closed and op != "open":
                    target = libdm.Pool.load(pool.directory)  # the kept one is closed
                out.value = apply_op(target, op, args)
                out.ok = True
            except Exception as exc:
                d = describe_exc(exc)
                out.error, out.libdm = d["type"], d["libdm"]
                out.usage = isinstance(exc, ValueError)
                if d["libdm"] is False and isinstance(exc, OSError) and exc.filename:
                    out.libdm = True  # an OSError that names its file
                out.text = d["message"]
            finally:
                if target is not pool.lib and target is not None:
                    target.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(CHILD_TIMEOUT)
        if thread.is_alive():
            self.stats.wedged += 1
            self._fail(
                f"pool wedged: {op}({args}) in this process did not return in {CHILD_TIMEOUT:g} s"
            )
        if op == "destroy" and out.ok:
            pool.lib = None  # destroy closed it
        return out

    @staticmethod
    def _spawn(argv, env, stdin=subprocess.PIPE):
        return subprocess.Popen(
            argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def _finish(self, proc, what, delay):
        try:
            if delay is not None:
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.kill()
            out, err = proc.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.stats.wedged += 1
            self._fail(f"pool wedged: {what} did not finish within {CHILD_TIMEOUT:g} s")
        return out, err

    @staticmethod
    def _env(point):
        env = dict(os.environ)
        env.pop("LIBDM_CRASH_AT", None)
        if point is not None:
            env["LIBDM_CRASH_AT"] = point
        return env

    def _load_child(self, pool, op, args, point, delay):
        proc = self._spawn(
            [sys.executable, "-c", CHILD, json.dumps({"op": op, "args": args})], self._env(point)
        )
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            _, err = proc.communicate()
            self._fail(f"the child for {op} did not start: {err.strip()[-2000:]}")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = self._finish(proc, f"{op}({args}) in a child", delay)
        if proc.returncode == -signal.SIGKILL:
            return Outcome(killed=True)
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            return Outcome(error=f"exit {proc.returncode}", text=err.strip()[-2000:])
        res = json.loads(lines[-1])
        if res["ok"]:
            return Outcome(ok=True, value=res["value"])
        libdm_error = res["libdm"] or (res["type"].endswith("OSError") and bool(res["filename"]))
        return Outcome(
            error=res["type"],
            libdm=libdm_error,
            usage=res["type"].endswith("ValueError"),
            text=f"{res['message']} at {res.get('where')}",
        )

    def _cli_argv(self, pool, op, args):
        base = [sys.executable, "-m", "libdm", "--debug", "--pool", pool.directory]
        if op == "create_thin":
            return [*base, "thin", "create", args["name"], f"{args['size'] // KiB}K"]
        if op == "snapshot":
            return [*base, "thin", "snapshot", args["origin"], args["name"]]
        if op in ("delete", "activate", "deactivate"):
            return [*base, "thin", op, args["name"]]
        if op == "resize_thin":
            return [*base, "thin", "resize", "--force", args["name"], f"{args['size'] // KiB}K"]
        if op == "ls":
            return [*base[:3], "--json", *base[3:], "thin", "ls"]
        if op == "destroy":
            return [*base, "pool", "destroy"]
        if op == "open":
            return [*base, "pool", "open", pool.directory]
        raise AssertionError(op)

    def _cli(self, pool, op, args, point, delay):
        proc = self._spawn(
            self._cli_argv(pool, op, args), self._env(point), stdin=subprocess.DEVNULL
        )
        out, err = self._finish(proc, f"libdm {op} {args}", delay)
        if proc.returncode == -signal.SIGKILL:
            return Outcome(killed=True)
        if proc.returncode == 0:
            value = None
            if op == "ls":
                value = [[r["name"], r["size"], r["parent"], r["active"]] for r in json.loads(out)]
            return Outcome(ok=True, value=value)
        lines = [line for line in err.strip().splitlines() if line.startswith("libdm: ")]
        line = lines[-1] if lines else err.strip()[-500:]
        cls = _cli_exception(err)
        # No traceback: the CLI's own report of what the library said.
        libdm_error = (
            (cls is None and line.startswith("libdm: "))
            or (cls is not None and cls.startswith("libdm."))
            or (cls in ("OSError", "FileNotFoundError", "PermissionError") and ": '/" in err)
        )
        outcome = Outcome(
            error=f"exit {proc.returncode} ({cls or 'no traceback'})",
            libdm=proc.returncode == 1 and libdm_error,
            usage=proc.returncode == 2,
            text=line,
        )
        if out.strip() and op in ("create_thin", "snapshot"):
            # It printed the new device's path, as on success, and failed.
            outcome.text += f" [stdout said {out.strip()!r}]"
            outcome.libdm = False
        return outcome

    def _monitor(self, pool, point, delay):
        """``libdm monitor serve`` watching the pool (far from its
        thresholds: it must only watch), until it says it is running."""
        cfg = self.base / f"monitor-{pool.key}"
        run = self.base / f"run-{pool.key}"
        os.makedirs(cfg, exist_ok=True)
        with open(cfg / "pool.toml", "w") as fh:
            fh.write(f'pool = "{pool.directory}"\nthreshold = 95\npercent = 10\n')
        status = run / "monitor.json"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(status)
        env = dict(self._env(point), LIBDM_MONITOR_DIR=str(cfg), LIBDM_RUN_DIR=str(run))
        proc = self._spawn(
            [
                sys.executable,
                "-m",
                "libdm",
                "monitor",
                "serve",
                "--rescan",
                "0.2",
                "--interval",
                "0.2",
            ],
            env,
            stdin=subprocess.DEVNULL,
        )
        started = time.monotonic()
        running = False
        while time.monotonic() - started < 30 and proc.poll() is None:
            if delay is not None and time.monotonic() - started >= delay:
                break
            with contextlib.suppress(OSError, ValueError), open(status) as fh:
                running = bool(json.load(fh)["pools"][pool.directory]["running"])
            if running:
                time.sleep(0.3)  # a check or two
                break
            time.sleep(0.05)
        if delay is not None and proc.poll() is None:
            proc.kill()
        elif proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = self._finish(proc, "libdm monitor serve", None)
        if proc.returncode == -signal.SIGKILL:
            return Outcome(killed=True)
        if running and proc.returncode == 0:
            return Outcome(ok=True)
        return Outcome(
            error=f"monitor exit {proc.returncode}, running={running}", text=err.strip()[-1500:]
        )

    def _perform(self, pool, op, args, entry, kill):
        """Run ``op`` through ``entry``; ``kill``: None, ("point", spec) or
        ("delay", seconds)."""
        point = kill[1] if kill and kill[0] == "point" else None
        delay = kill[1] if kill and kill[0] == "delay" else None
        self.stats.ops[op] += 1
        self.stats.entries[entry] += 1
        if kill or self.ballast or self.read_only or op in THIN_ID_OPS:
            self.dump = True
        args = dict(args, directory=pool.directory)
        if entry == "library":
            out = self._library(pool, op, args)
        elif entry == "load":
            out = self._load_child(pool, op, args, point, delay)
        elif entry == "cli":
            out = self._cli(pool, op, args, point, delay)
        else:
            out = self._monitor(pool, point, delay)
        how = entry + (
            ""
            if kill is None
            else f" killed at {kill[1]}"
            if point
            else f" SIGKILL after {delay:.2f} s"
        )
        fs = (
            " [state fs FULL]"
            if self.ballast
            else " [state fs READ-ONLY]"
            if self.read_only
            else ""
        )
        shown = _short({k: v for k, v in args.items() if k != "directory"})
        self.log.append(f"{pool.key}:{op}({shown}) via {how}{fs}: {out.short()}")
        if out.killed:
            self.stats.kills += 1
            self.stats.killed_ops[op] += 1
            if point:
                self.stats.points[point.split("@")[0]] += 1
        return out

    # -- checking a pool ----------------------------------------------------------------------

    def _observe(self, pool, snap):
        state = witness.store_state(pool.directory)
        return {r["name"]: r for r in state["devices"]}, state

    def _diff(self, pool, model, rows, loose, snap):
        diffs = []
        if set(rows) != set(model):
            diffs.append(f"devices {sorted(rows)}, model {sorted(model)}")
        for name, dev in model.items():
            row = rows.get(name)
            if row is None:
                continue
            if row["size"] * 512 != dev.size:
                diffs.append(f"{name}: size {row['size'] * 512}, model {dev.size}")
            if row["parent"] != dev.parent:
                diffs.append(f"{name}: parent {row['parent']}, model {dev.parent}")
            if name not in loose and bool(row["active"]) != dev.active:
                diffs.append(f"{name}: store active={row['active']}, model active={dev.active}")
        return diffs

    def _disagreements(self, pool, state, snap):
        """Store against kernel against thin_dump, for one pool of a crowded
        namespace: a live device of the pool's name is the pool's only
        when its uuid says so."""
        found = []
        if state["intents"]:
            found.append(f"intents left in the store: {state['intents']}")
        st = witness.parse_pool_status(snap["statuses"][pool.name][0])
        if st["failed"]:
            return [*found, f"pool {pool.name} has failed"]
        if state["txid"] != st["txid"]:
            found.append(f"transaction id: store {state['txid']}, kernel {st['txid']}")
        recorded = {r["thin_id"] for r in state["devices"]}
        queued = {r["thin_id"] for r in state["deferred"]}
        if self.dump:  # thin_dump costs seconds: only after a change of thin ids
            meta = witness.devnode(witness.parse_pool_table(snap["tables"][pool.name][0])["meta"])
            on_disk = witness.thin_ids(pool.name, meta=meta)
            leaked = on_disk - recorded - queued - set(state["foreign"])
            phantom = (recorded | queued) - on_disk
            if leaked:
                found.append(f"leaked thin ids (on disk, not in the store) {sorted(leaked)}")
            if phantom:
                found.append(f"records without a thin id on disk {sorted(phantom)}")
        # The live thin devices over this pool, by thin id, from their tables.
        pinfo = snap["infos"][pool.name]
        devno = f"{pinfo['major']}:{pinfo['minor']}"
        live: dict[int, list[str]] = {}
        for name, lines in snap["tables"].items():
            f = lines[0].split() if len(lines) == 1 else []
            if f[2:4] == ["thin", devno]:
                live.setdefault(int(f[4]), []).append(name)
        for row in state["devices"]:
            names = live.pop(row["thin_id"], [])
            tid = row["thin_id"]
            if row["active"] and not names:
                found.append(
                    f"{row['name']}: store active=1, but no live device maps thin id {tid}"
                )
            elif not row["active"] and names:
                found.append(f"{row['name']}: store active=0, but {names} map its thin id {tid}")
            elif names and names != [pool.dm(row["name"])]:
                found.append(
                    f"{row['name']}: thin id {tid} live as {names}, not {pool.dm(row['name'])}"
                )
        if live:
            found.append(f"live devices over the pool that the store does not record: {live}")
        return found

    def _check_pool(self, pool, candidates, loose, what, snap, *, whole=True):
        """The pool is healthy, its witnesses agree, it is one of the
        ``candidates`` (models: name -> Dev), and every page reads back.
        Not ``whole``: only its store against its model and its pages (a
        pool that did not act; its devices in the kernel are checked by
        :meth:`check_foreign`)."""
        if not whole:
            rows, _ = self._observe(pool, snap)
            d = self._diff(pool, candidates[0], rows, (), snap)
            if d:
                self.stats.disagreements += 1
                self._fail(f"after {what}: pool {pool.name}, which did not act, changed: {d}")
            self._check_content(pool, what)
            return
        try:
            problems = witness.pool_problems(pool.directory, snapshot=snap)
        except witness.PoolWedged as exc:
            self.stats.wedged += 1
            self._fail(f"after {what}: pool {pool.name}: {exc}")
        if problems:
            if any("suspended" in p for p in problems):
                self.stats.wedged += 1
            self._fail(f"after {what}: pool {pool.name} is unhealthy: " + "; ".join(problems))
        rows, state = self._observe(pool, snap)
        found = self._disagreements(pool, state, snap)
        if found:
            self.stats.disagreements += len(found)
            self._fail(
                f"after {what}: pool {pool.name}: store, kernel and thin_dump disagree: "
                + "; ".join(found)
            )
        diffs = []
        for i, cand in enumerate(candidates):
            d = self._diff(pool, cand, rows, loose, snap)
            if not d:
                pool.devices = copy.deepcopy(cand)
                break
            diffs.append(f"outcome {i} of {len(candidates)}: " + "; ".join(d))
        else:
            self.stats.disagreements += 1
            self._fail(
                f"after {what}: pool {pool.name} matches no allowed outcome:\n    "
                + "\n    ".join(diffs)
            )
        for name, dev in pool.devices.items():
            dev.active = bool(rows[name]["active"])
        self._check_content(pool, what)

    def _check_content(self, pool, what):
        for name, dev in sorted(pool.devices.items()):
            if not dev.active:
                continue
            path = f"/dev/mapper/{pool.dm(name)}"
            pages = sorted(p for p, t in dev.pages.items() if t != UNKNOWN)
            unwritten = next(i for i in range(dev.size // PAGE + 1) if i not in dev.pages)
            if unwritten < dev.size // PAGE:
                pages.append(unwritten)
            for page in sorted(pages):
                try:
                    got = witness.read_direct(path, page * PAGE, PAGE)
                except witness.PoolWedged as exc:
                    self.stats.wedged += 1
                    self._fail(f"after {what}: {exc}")
                tag = dev.pages.get(page)
                want = bytes(PAGE) if tag is None else pattern(tag)
                if got != want:
                    self.stats.losses += 1
                    self._fail(
                        f"after {what}: pool {pool.name}'s device {name} ({path}) page {page} "
                        f"holds {describe_page(got)} (sha256 {sha(got)}), expected "
                        f"{'zeros' if tag is None else f'write #{tag}'} (sha256 {sha(want)})"
                    )

    def _settle(self, acting, candidates, loose, what, before):
        """After a step whose result is known: nothing foreign changed, and
        every pool is whole (``acting`` is one of ``candidates``)."""
        self.stats.steps += 1
        self.world = self.check_foreign(acting, before, what)
        snap = self.world["snap"]
        try:
            for key, pool in self.pools.items():
                if key == acting:
                    self._check_pool(pool, candidates, loose, what, snap)
                else:
                    self._check_pool(pool, [pool.devices], (), what, snap, whole=False)
        finally:
            self.dump = False

    # -- the steps ---------------------------------------------------------------------------

    def _squatted(self, pool, name, snap=None):
        """Device ``name`` of ``pool`` is inactive, and its device-mapper
        name is held by another pool's device or another program's."""
        snap = snap or self.world["snap"]
        dev = pool.devices.get(name)
        return dev is not None and not dev.active and pool.dm(name) in snap["infos"]

    def _taken(self, pool, name):
        return name in pool.devices or pool.dm(name) in self.world["snap"]["infos"]

    def _entry(self, allow_monitor=False):
        entries = ENTRIES if allow_monitor else ENTRIES[:3]
        return self.rnd.choice(entries)

    def _kill(self, op, entry):
        if entry == "library" or self.rnd.random() >= 0.4:
            return None
        points = POINTS_FOR.get(op, ())
        if points and self.rnd.random() < 0.75:
            return ("point", f"{self.rnd.choice(points)}@1")
        if entry == "cli":  # Python takes about a second to start here
            return ("delay", self.rnd.uniform(1.0, 2.2))
        if entry == "monitor":
            return ("delay", self.rnd.uniform(0.5, 3.0))
        return ("delay", self.rnd.uniform(0.0, 0.08))

    def _expect(self, pool, op, args):
        """What ``op`` on ``pool`` may give: (its model if it happens, whether
        it must happen, may be refused, must be refused)."""
        before = pool.devices
        after = copy.deepcopy(before)
        name = args.get("name")
        must, may_refuse = "ok", False
        if op in ("delete", "resize_thin", "activate", "deactivate") and name not in before:
            # A script's device whose create was refused (a name that can
            # collide with another pool's): the pool has no such device.
            return after, "error"
        if op == "create_thin":
            if self._taken(pool, name):
                return after, "error"
            after[name] = Dev(args["size"], None, True)
            may_refuse = "-" in name  # a scheme that refuses names that can collide
        elif op == "snapshot":
            origin = args["origin"]
            if self._taken(pool, name):
                return after, "error"
            src = before[origin]
            after[name] = Dev(src.size, origin, True, dict(src.pages))
            may_refuse = "-" in name or self._squatted(pool, origin)
        elif op == "delete":
            del after[name]
            for dev in after.values():
                if dev.parent == name:
                    dev.parent = None
            may_refuse = self._squatted(pool, name)
        elif op == "resize_thin":
            dev = after[name]
            old, new = dev.size, args["size"]
            dev.size = new
            if new < old:
                cut = new // PAGE
                for page in [p for p in dev.pages if p >= cut]:
                    if dev.active:
                        del dev.pages[page]
                    else:
                        dev.pages[page] = UNKNOWN
                for page in [p for p in before[name].pages if p >= cut]:
                    before[name].pages[page] = UNKNOWN  # killed midway: maybe cut already
            may_refuse = self._squatted(pool, name)
        elif op == "activate":
            if self._squatted(pool, name):
                return after, "error"
            after[name].active = True
        elif op == "deactivate":
            after[name].active = False
            may_refuse = self._squatted(pool, name)
        elif op in ("ls", "watch", "open", "destroy"):
            may_refuse = op in ("destroy", "open") and any(self._squatted(pool, n) for n in before)
        return after, ("may" if may_refuse else must)

    def _step_change(self, pool, op, args, entry, kill, hostile=None):
        before_world = self.world
        before = copy.deepcopy(pool.devices)
        after, expect = self._expect(pool, op, args)
        before = pool.devices  # _expect may mark pages UNKNOWN
        if op == "watch":
            out = self._perform(pool, "watch", args, "monitor", kill)
        else:
            out = self._perform(pool, op, args, entry, kill)
        what = self.log[-1]
        loose = {args["name"]} if "name" in args else set()
        if op == "snapshot":
            loose.add(args["origin"])
        if out.killed:
            self.world = self.check_foreign(pool.key, before_world, what)
            self.pending = (pool.key, [copy.deepcopy(before), after], loose)
            return out
        if not out.ok:
            if hostile in ("full", "full-alone") and op == "ls":
                self._fail(
                    f"{what}\n  listing the devices failed on a full state filesystem "
                    f"(reading needs no space): {out.error}: {out.text}"
                )
            if not out.libdm and not (out.usage and expect in ("error", "may")):
                self.stats.bad_errors += 1
                self._fail(
                    f"{what}\n  {op} failed with {out.error}, which is not a libdm error "
                    f"(a DMError, or an OSError naming its file): {out.text}"
                )
            said = HOSTILE_WORDS.get(hostile)
            words = re.sub(r"/\S+", "", out.text)  # not a word of a path
            # A refusal the model allows on its own account (a name that
            # can collide, a device another program took) comes before
            # the store is touched: it need not speak of the filesystem.
            allowed = expect == "may" and re.search(
                r"DeviceExistsError|ForeignDeviceError", f"{out.error} {out.text}"
            )
            if (
                said
                and expect != "error"
                and not allowed
                and not re.search(said, words, re.IGNORECASE)
            ):
                self.stats.bad_errors += 1
                self._fail(
                    f"{what}\n  the error does not say what happened to the state "
                    f"filesystem ({hostile}; no match for {said!r}): {out.text}"
                )
            if hostile:
                # The kernel may have made the change before the store failed.
                self.world = self.check_foreign(pool.key, before_world, what)
                self.pending = (pool.key, [copy.deepcopy(before), after], loose)
                return out
            if expect == "ok":
                self._fail(
                    f"{what}\n  {op} should have worked, and failed: {out.error}: {out.text}"
                )
            self._settle(pool.key, [before], (), what, before_world)
            return out
        if expect == "error":
            self._fail(f"{what}\n  {op} should have been refused, and it worked")
        if op == "ls":
            self._check_listing(pool, out.value, [before], what)
        if hostile:
            self.world = self.check_foreign(pool.key, before_world, what)
            self.pending = (pool.key, [after], set())
            return out
        self._settle(pool.key, [after], (), what, before_world)
        return out

    def _check_listing(self, pool, value, candidates, what):
        """A listing shows exactly one of the candidates (names, sizes,
        parents; active flags too where the model is sure); returns those
        it matches."""
        listed = {r[0]: r for r in value}
        matching = []
        for cand in candidates:
            if set(listed) == set(cand) and all(
                listed[n][1] == d.size and listed[n][2] == d.parent for n, d in cand.items()
            ):
                matching.append(cand)
        if not matching:
            self.stats.disagreements += 1
            self._fail(
                f"{what}\n  the listing {_short(value, 600)} matches none of "
                f"{[sorted(c) for c in candidates]}"
            )
        return matching

    def _settle_pending(self, listing=None, op=None, args=None, entry=None):
        """After a kill or a failed step on a hostile filesystem: maybe a
        listing (through ``listing``, an entry point), then a change (``op``
        through ``entry``; drawn when None), which must settle what was left
        (or refuse, naming what to run)."""
        key, candidates, loose = self.pending
        pool = self.pools[key]
        self.pending = None
        note = ""
        if listing is None and self.rnd.random() < 0.4 and len(candidates) > 1:
            listing = self._entry()
        if listing:
            out = self._perform(pool, "ls", {}, listing, None)
            if not out.ok and not out.libdm:
                self.stats.bad_errors += 1
                self._fail(
                    f"{self.log[-1]}\n  ls after an interrupted change failed with {out.error}"
                )
            if out.ok:
                candidates = self._check_listing(pool, out.value, candidates, self.log[-1])
                if len(candidates) == 1:
                    note = (
                        f" (while the change was pending, ls via {listing} listed "
                        f"{sorted(candidates[0])}: the pool must end up so)"
                    )
        # Not a device whose name another program holds: its delete is
        # refused for that reason alone, which says nothing of recovery.
        common = [
            n
            for n in candidates[0]
            if all(n in c for c in candidates) and not self._squatted(pool, n)
        ]
        if op is None:
            if all(len(c) < MAX_DEVICES for c in candidates) or not common:
                self.counter += 1
                op, args = "create_thin", {"name": f"r{self.counter}", "size": 2 * MiB}
            else:
                op, args = "delete", {"name": self.rnd.choice(sorted(common))}
        name = args.get("name")
        nexts = []
        for c in candidates:
            n = copy.deepcopy(c)
            if op == "create_thin":
                n[name] = Dev(args["size"], None, True)
            elif op == "delete":
                del n[name]
                for d in n.values():
                    if d.parent == name:
                        d.parent = None
            nexts.append(n)
        entry = entry or self._entry()
        before_world = self.world
        out = self._perform(pool, op, args, entry, None)
        what = self.log[-1] + " (the first change after an interrupted one)" + note
        if not out.ok:
            hint = re.search(r"pool open|Pool\.open|libdm pool repair|repair", out.text)
            if not out.libdm or not hint:
                self.stats.bad_errors += 1
                self._fail(
                    f"{what}\n  failed with {out.error}: {out.text}\n  (after an interrupted "
                    f"change, every entry point must finish or undo it, or refuse with a "
                    f"libdm error that says what to run)"
                )
            # Refused, saying what to run: run it, then the change again.
            self._perform(pool, "open", {}, "load", None)
            out = self._perform(pool, op, args, entry, None)
            if not out.ok:
                self._fail(f"{self.log[-1]}\n  failed after the pool was opened: {out.text}")
        self._settle(key, nexts, loose - {name}, what, before_world)

    def run_script(self, script):
        """Run fixed steps (the scripted examples): tuples of
        ``("change", pool, op, args, entry, kill)``, ``("restart", pool,
        entry, entry)``, ``("write", pool, device, first page, pages)``,
        ``("squat", pool, device)``, ``("settle", pool, listing entry or
        "", op, args, entry)`` and ``(hostile kind, pool, op, args, entry)``."""
        for item in script:
            kind, key = item[0], item[1]
            pool = self.pools[key]
            if kind == "change":
                _, _, op, args, entry, kill = item
                self._step_change(pool, op, args, entry, kill)
            elif kind == "restart":
                self._restart(pool, item[2], item[3])
            elif kind == "write":
                self._write(key, item[2], item[3], item[4])
            elif kind == "squat":
                self._squat(key, item[2])
            elif kind == "settle":
                # The next change: the first after an interrupted one, if any.
                _, _, listing, op, args, entry = item
                if self.pending is None:
                    self._step_change(pool, op, args, entry, None)
                else:
                    self._settle_pending(listing or False, op, args, entry)
            else:
                self._hostile(kind, pool, item[2])
        if self.pending is not None:
            self._settle_pending(False, None, None, "library")

    def step(self):
        if self.stats.steps >= CONTEXT["steps"] and self.stats.kills >= CONTEXT["kills"]:
            return
        if self.pending is not None:
            self._settle_pending()
            return
        rnd = self.rnd
        roll = rnd.random()
        if roll < 0.08 and self.squat_count < MAX_SQUATTERS and self._squat():
            return
        if 0.08 <= roll < 0.10 and self.squat_count:
            self._unsquat()
            return
        if roll < 0.20:
            self._write()
            return
        hostile = None
        if roll > 0.93:
            hostile = rnd.choice(["full", "full", "full-alone", "read-only"])
        pool = self.pools[rnd.choice(sorted(self.pools))]
        if hostile:
            self._hostile(hostile, pool, rnd.randint(1, 3))
            return
        op, args = self._draw(pool, hostile)
        entry = "monitor" if op == "watch" else self._entry()
        if op in ("destroy",):
            self._restart(pool, entry)
            return
        self._step_change(pool, op, args, entry, self._kill(op, entry))

    def _draw(self, pool, hostile):
        rnd = self.rnd
        devs = pool.devices
        weights = [
            ("create_thin", 14),
            ("snapshot", 10 if devs else 0),
            ("delete", 10 if devs else 0),
            ("resize_thin", 5 if devs else 0),
            ("activate", 7 if devs else 0),
            ("deactivate", 7 if devs else 0),
            ("ls", 4),
            ("open", 0 if hostile else 3),
            ("destroy", 0 if hostile else 3),
            ("watch", 0 if hostile else 3),
        ]
        if len(devs) >= MAX_DEVICES:
            weights[0] = ("create_thin", 0)
            weights[1] = ("snapshot", 0)
        ops = [op for op, w in weights for _ in range(w)]
        op = rnd.choice(ops)
        names = NAMES[pool.key]
        if op == "create_thin":
            return op, {"name": rnd.choice(names), "size": rnd.choice([MiB, 2 * MiB])}
        if op == "snapshot":
            return op, {"origin": rnd.choice(sorted(devs)), "name": rnd.choice(names)}
        squatted = sorted(n for n in devs if self._squatted(pool, n))
        if squatted and rnd.random() < 0.5:
            devs = {n: devs[n] for n in squatted}  # where names collide
        if op == "resize_thin":
            name = rnd.choice(sorted(devs))
            old = devs[name].size
            new = rnd.choice([old + BLOCK, max(BLOCK, old - BLOCK), old + MiB])
            return op, {"name": name, "size": min(new, 4 * MiB)}
        if op in ("delete", "activate", "deactivate"):
            return op, {"name": rnd.choice(sorted(devs))}
        return op, {}

    def _restart(self, pool, entry, open_entry=None):
        """Tear the pool down (destroy, files kept) and open it again, each
        through a random entry point: as after a reboot."""
        before_world = self.world
        before = pool.devices
        out = self._perform(pool, "destroy", {}, entry, None)
        if not out.ok and not out.libdm:
            self.stats.bad_errors += 1
            self._fail(f"{self.log[-1]}\n  destroy failed with {out.error}: {out.text}")
        self.world = self.check_foreign(pool.key, before_world, self.log[-1])
        if not out.ok and not any(self._squatted(pool, n) for n in before):
            self._fail(f"{self.log[-1]}\n  destroy should have worked: {out.text}")
        opened = self._perform(pool, "open", {}, open_entry or self._entry(), None)
        # A device whose name another holds may be reported as not activated.
        squatted = opened.libdm and any(self._squatted(pool, n) for n in before)
        if not opened.ok and not squatted:
            self._fail(
                f"{self.log[-1]}\n  the pool did not open again: {opened.error}: {opened.text}"
            )
        if pool.lib is None:
            pool.lib = libdm.Pool.load(pool.directory)
        self._settle(pool.key, [before], (), self.log[-1] + " (after destroy)", self.world)

    def _write(self, key=None, name=None, first=None, pages=None):
        """Write known patterns (O_DIRECT, then fsync) to an active device."""
        if key is None:
            active = [
                (k, n)
                for k, p in sorted(self.pools.items())
                for n, d in sorted(p.devices.items())
                if d.active
            ]
            if not active or self.writes >= MAX_WRITES:
                return
            key, name = self.rnd.choice(active)
        pool = self.pools[key]
        dev = pool.devices[name]
        if pages is None:
            pages = self.rnd.choice([1, 3, 8])
            first = self.rnd.randrange(max(1, dev.size // PAGE - pages + 1))
        tags = []
        for _ in range(pages):
            self.tag += 1
            tags.append(self.tag)
        self.writes += 1
        self.stats.ops["write"] += 1
        self.log.append(f"{key}:write({name}, pages {first}+{pages}, #{tags[0]}..)")
        try:
            witness.write_direct(
                f"/dev/mapper/{pool.dm(name)}", first * PAGE, b"".join(map(pattern, tags))
            )
        except witness.PoolWedged as exc:
            self.stats.wedged += 1
            self._fail(str(exc))
        for i, t in enumerate(tags):
            dev.pages[first + i] = t
        self._settle(key, [pool.devices], (), self.log[-1], self.world)

    def _squat(self, key=None, name=None):
        """Another program creates a device under the name of a pool's
        inactive device (over its own loop device)."""
        if key is None:
            choices = [
                (k, n)
                for k, p in sorted(self.pools.items())
                for n, d in sorted(p.devices.items())
                if not d.active and p.dm(n) not in self.world["snap"]["infos"]
            ]
            if not choices:
                return False
            key, name = self.rnd.choice(choices)
        dm = self.pools[key].dm(name)
        self.squat_count += 1
        offset = FOREIGN_DM * (1 + self.squat_count % 3)
        self._foreign_create(
            dm,
            f"0 {FOREIGN_DM} linear {_devno(self.foreign_disk)} {offset}",
            f"OTHERPROG-squat-{self.squat_count}-{dm[-8:]}",
        )
        self.log.append(f"another program: dmsetup create {dm} (linear over {self.foreign_disk})")
        self.world = self.foreign_world()
        return True

    def _unsquat(self):
        squatters = sorted(n for n, f in self.foreign_dm.items() if "squat" in f["uuid"])
        if not squatters:
            return
        name = self.rnd.choice(squatters)
        self.log.append(f"another program: dmsetup remove {name}")
        if name in self.world["dm"]:
            witness.dmsetup("remove", name, check=False)
        del self.foreign_dm[name]
        self.squat_count -= 1
        self.world = self.foreign_world()

    # -- a hostile state filesystem -------------------------------------------------------------

    def _fill(self):
        self.ballast = str(self.statefs / ".ballast")
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            chunk = b"\xa5" * (64 * KiB)
            for size in (64 * KiB, PAGE, 512):
                while True:
                    try:
                        os.write(fd, chunk[:size])
                    except OSError:
                        break
        finally:
            os.close(fd)

    def _give_back(self):
        if self.ballast is not None:
            os.unlink(self.ballast)
            self.ballast = None
        if self.read_only:
            _run("mount", "-o", "remount,rw", str(self.statefs))
            self.read_only = False
        if self.kept_closed:
            self.kept_closed = False
            for pool in self.pools.values():
                pool.lib = libdm.Pool.load(pool.directory)

    def _hostile(self, kind, pool, steps):
        """Make the state filesystem hostile (``full``: filled, the kept
        pools open; ``full-alone``: filled, no other user of the pools open;
        ``read-only``), run ``steps`` ((op, args, entry), or a count to
        draw) until one fails, give the space back and check."""
        self.stats.hostile[kind] += 1
        if kind != "full":
            self._close_kept()
        if kind == "read-only":
            _run("mount", "-o", "remount,ro", str(self.statefs))
            self.read_only = True
        else:
            self._fill()
        changed = False
        try:
            for i in range(steps if isinstance(steps, int) else len(steps)):
                if isinstance(steps, int):
                    op, args = self._draw(pool, kind)
                    entry = self._entry()
                else:
                    op, args, entry = steps[i]
                self._step_change(pool, op, args, entry, None, hostile=kind)
                if self.pending is None or len(self.pending[1]) > 1:
                    break  # settled (refused as expected), or failed: pending
                pool.devices = self.pending[1][0]  # it worked: checked when there is room
                self.pending = None
                changed = True
        finally:
            self._give_back()
        self.log.append(f"the state filesystem ({kind}) given back")
        if self.pending is None and changed:
            self._settle(pool.key, [pool.devices], (), self.log[-1], self.world)

    def _close_kept(self):
        """Close the library's kept pools (a read-only remount needs every
        file open for writing closed; or no other user of the pools)."""
        for p in self.pools.values():
            if p.lib is not None:
                p.lib.close()
                p.lib = None
        self.kept_closed = True


def _sysfs_text(path):
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return text[: -len(" (deleted)")] if text.endswith(" (deleted)") else text


# -- running it ------------------------------------------------------------------------------


def _run_world(steps, kills, per_example):
    stats = CONTEXT["stats"]
    seed = int(os.environ.get("LIBDM_STATEFUL_SEED") or int.from_bytes(os.urandom(4), "big"))
    print(f"\nWorldMachine: LIBDM_STATEFUL_SEED={seed}")
    CONTEXT.update(steps=steps, kills=kills, rnd=random.Random(seed), seed=seed)
    rounds = 0
    try:
        while stats.steps < steps or stats.kills < kills:
            rounds += 1
            assert rounds <= MAX_EXAMPLES, (
                f"{rounds - 1} examples made only {stats.steps} steps and {stats.kills} kills "
                f"(wanted {steps} and {kills})"
            )
            machine = WorldMachine()
            try:
                machine.build()
                for _ in range(per_example):
                    machine.step()
            finally:
                machine.teardown()
    finally:
        reached = set(stats.points)
        wanted = {p for points in POINTS_FOR.values() for p in points}
        reliability.record(
            "stateful world",
            steps=stats.steps,
            kills=stats.kills,
            examples=stats.examples,
            losses=stats.losses,
            disagreements=stats.disagreements,
            wedged=stats.wedged,
            foreign_touched=stats.foreign_touched,
            bad_errors=stats.bad_errors,
            hostile_full=stats.hostile["full"] + stats.hostile["full-alone"],
            hostile_read_only=stats.hostile["read-only"],
            operations=sorted(stats.ops),
            entry_points=sorted(stats.entries),
            killed_operations=sorted(stats.killed_ops),
            crash_points_reached=sorted(reached),
            gaps=reliability.gaps(wanted, reached) + reliability.gaps(ENTRIES, stats.entries),
        )
        print(
            f"\nWorldMachine: {stats.steps} steps in {stats.examples} examples, {stats.kills} "
            f"kills; entry points {dict(stats.entries)}; operations {dict(stats.ops)}; killed "
            f"{dict(stats.killed_ops)}; crash points {dict(stats.points)}; hostile state "
            f"filesystem {dict(stats.hostile)}; losses {stats.losses}, disagreements "
            f"{stats.disagreements}, wedged {stats.wedged}, foreign touched "
            f"{stats.foreign_touched}, non-libdm errors {stats.bad_errors}"
        )
    assert set(crash.POINTS) >= wanted


def test_stateful_world(dm_prefix, tmp_path):
    CONTEXT.update(dm_prefix=dm_prefix, workdir=tmp_path, stats=Stats())
    _run_world(TOTAL_STEPS, TOTAL_KILLS, STEPS_PER_EXAMPLE)


# -- the shortest examples, scripted ----------------------------------------------------------
#
# The same machine and checks through fixed steps: each is the shortest
# example of one way a pool can touch what it did not make, or leave an
# interrupted change for the next entry point to trip on.

SCRIPTS = {
    # Pool P's inactive b-x and pool P-b's live x share the name P-b-x.
    "delete-inactive-device-named-like-another-pools": [
        ("change", "p", "create_thin", {"name": "b-x", "size": MiB}, "library", None),
        ("change", "p", "deactivate", {"name": "b-x"}, "library", None),
        ("change", "pb", "create_thin", {"name": "x", "size": MiB}, "library", None),
        ("write", "pb", "x", 0, 4),
        ("change", "p", "delete", {"name": "b-x"}, "library", None),
    ],
    "resize-inactive-device-named-like-another-pools": [
        ("change", "p", "create_thin", {"name": "b-x", "size": MiB}, "cli", None),
        ("change", "p", "deactivate", {"name": "b-x"}, "cli", None),
        ("change", "pb", "create_thin", {"name": "x", "size": MiB}, "cli", None),
        ("write", "pb", "x", 0, 4),
        ("change", "p", "resize_thin", {"name": "b-x", "size": 2 * MiB}, "cli", None),
    ],
    "open-takes-another-pools-device-for-its-own": [
        ("change", "p", "create_thin", {"name": "b-x", "size": MiB}, "cli", None),
        ("change", "p", "deactivate", {"name": "b-x"}, "cli", None),
        ("change", "pb", "create_thin", {"name": "x", "size": MiB}, "cli", None),
        ("change", "p", "open", {}, "cli", None),
    ],
    # Another program's linear device under the name of P's inactive c.
    "delete-inactive-device-whose-name-another-program-took": [
        ("change", "p", "create_thin", {"name": "c", "size": MiB}, "cli", None),
        ("change", "p", "deactivate", {"name": "c"}, "cli", None),
        ("squat", "p", "c"),
        ("change", "p", "delete", {"name": "c"}, "cli", None),
    ],
    "deactivate-inactive-device-whose-name-another-program-took": [
        ("change", "p", "create_thin", {"name": "c", "size": MiB}, "load", None),
        ("change", "p", "deactivate", {"name": "c"}, "load", None),
        ("squat", "p", "c"),
        ("change", "p", "deactivate", {"name": "c"}, "load", None),
    ],
    "restart-pool-whose-inactive-device-name-another-program-took": [
        ("change", "p", "create_thin", {"name": "c", "size": MiB}, "library", None),
        ("change", "p", "deactivate", {"name": "c"}, "library", None),
        ("squat", "p", "c"),
        ("restart", "p", "library", "cli"),
    ],
    # The first change after a kill, through an entry point other than Pool.open.
    "cli-create-after-a-kill-at-create-intent": [
        (
            "change",
            "p",
            "create_thin",
            {"name": "c", "size": MiB},
            "cli",
            ("point", "create:intent@1"),
        ),
        ("settle", "p", "", "create_thin", {"name": "d", "size": MiB}, "cli"),
    ],
    "library-create-after-a-kill-at-create-transaction": [
        (
            "change",
            "p",
            "create_thin",
            {"name": "c", "size": MiB},
            "load",
            ("point", "create:transaction@1"),
        ),
        ("settle", "p", "", "create_thin", {"name": "d", "size": MiB}, "library"),
    ],
    # A delete killed past its discard: listed as usable, then deleted by open.
    "ls-lists-a-device-whose-delete-is-pending": [
        ("change", "p", "create_thin", {"name": "c", "size": MiB}, "library", None),
        ("write", "p", "c", 0, 2),
        ("change", "p", "delete", {"name": "c"}, "load", ("point", "delete:deactivated@1")),
        ("settle", "p", "cli", "open", {}, "cli"),
    ],
    # A create killed once the kernel made its device: listed as the next
    # change leaves it, so ls does not hide a device that then appears.
    "ls-lists-a-device-whose-create-the-kernel-made": [
        (
            "change",
            "p",
            "create_thin",
            {"name": "c", "size": MiB},
            "load",
            ("point", "create:transaction@1"),
        ),
        ("settle", "p", "load", "create_thin", {"name": "d", "size": MiB}, "library"),
    ],
    "cli-ls-lists-a-device-whose-create-the-kernel-made": [
        (
            "change",
            "p",
            "create_thin",
            {"name": "c", "size": MiB},
            "cli",
            ("point", "create:transaction@1"),
        ),
        ("settle", "p", "cli", "create_thin", {"name": "d", "size": MiB}, "cli"),
    ],
    # A full, then a read-only state filesystem, through each entry point:
    # creates until one meets ENOSPC, then the space is given back.
    "library-creates-on-a-full-state-filesystem": [
        (
            "full",
            "p",
            [
                (op, {"name": n, "size": MiB}, "library")
                for n in "cdefghijkl"
                for op in ("create_thin", "delete")
            ],
        ),
        ("settle", "p", "", "create_thin", {"name": "m", "size": MiB}, "library"),
    ],
    "cli-creates-on-a-full-state-filesystem-used-by-nobody-else": [
        ("full-alone", "p", [("create_thin", {"name": n, "size": MiB}, "cli") for n in "cdefg"]),
        ("settle", "p", "", "create_thin", {"name": "h", "size": MiB}, "cli"),
    ],
    "cli-ls-on-a-full-state-filesystem-used-by-nobody-else": [
        ("change", "p", "create_thin", {"name": "c", "size": MiB}, "cli", None),
        ("full-alone", "p", [("ls", {}, "cli")]),
    ],
    "library-create-on-a-read-only-state-filesystem": [
        ("read-only", "p", [("create_thin", {"name": "c", "size": MiB}, "library")]),
    ],
    "cli-delete-on-a-read-only-state-filesystem": [
        ("change", "p", "create_thin", {"name": "c", "size": MiB}, "library", None),
        ("read-only", "p", [("delete", {"name": "c"}, "cli")]),
    ],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_world_example(script, dm_prefix, tmp_path):
    CONTEXT.update(
        dm_prefix=dm_prefix,
        workdir=tmp_path,
        stats=Stats(),
        rnd=random.Random(script),
        seed=f"(scripted: {script})",
        steps=10**9,
        kills=10**9,
    )
    machine = WorldMachine()
    try:
        machine.build()
        machine.run_script(SCRIPTS[script])
    finally:
        machine.teardown()


def test_the_world_checks_can_fail(dm_prefix, tmp_path):
    """Each way a step could touch what its pool did not make is seen: a
    check that cannot fail checks nothing."""
    CONTEXT.update(
        dm_prefix=dm_prefix,
        workdir=tmp_path,
        stats=Stats(),
        rnd=random.Random(0),
        seed="(checks)",
        steps=10**9,
        kills=10**9,
    )
    machine = WorldMachine()

    def caught(change, *words):
        before = machine.foreign_world()
        change()
        with pytest.raises(StepFailed) as info:
            machine.check_foreign("p", before, "a test's change")
        for word in words:
            assert word in str(info.value), str(info.value)

    try:
        machine.build()
        p, pb = machine.pools["p"], machine.pools["pb"]
        # Nothing changed: nothing to say.
        machine.check_foreign("p", machine.foreign_world(), "nothing")
        notes = str(machine.statefs / "notes.txt")
        caught(lambda: os.chmod(notes, 0o666), "notes.txt", "0o100644", "0o100666")
        os.chmod(notes, 0o644)

        def append():
            with open(notes, "ab") as fh:
                fh.write(b"x")

        def add():
            with open(machine.statefs / "new", "wb"):
                pass

        caught(append, "notes.txt")
        machine.foreign_files[notes] = machine.file_facts(notes)
        caught(add, "holds", "'new'")
        os.unlink(machine.statefs / "new")
        # Another program's device: its contents, its table, its presence.
        linear = f"{p.name}-y"
        caught(
            lambda: witness.write_direct(f"/dev/mapper/{linear}", 0, bytes(PAGE)),
            f"contents of {linear}",
            f"contents of loop device {machine.foreign_disk}",
        )
        data = witness.read_direct(f"/dev/mapper/{linear}", 0, FOREIGN_DM * 512)
        machine.foreign_dm[linear]["sha"] = sha(data)
        path, size, _ = machine.foreign_loops[machine.foreign_disk]
        machine.foreign_loops[machine.foreign_disk] = (
            path,
            size,
            sha(witness.read_direct(machine.foreign_disk, 0, size)),
        )
        zero = f"{pb.name}-z"

        def reload():
            witness.dmsetup("reload", zero, "--table", f"0 {FOREIGN_DM // 2} zero")
            witness.dmsetup("resume", zero)

        caught(reload, f"device {zero} (another program's)", f"0 {FOREIGN_DM // 2} zero")
        witness.dmsetup("reload", zero, "--table", f"0 {FOREIGN_DM} zero")
        witness.dmsetup("resume", zero)
        caught(lambda: witness.dmsetup("suspend", zero), "SUSPENDED")
        witness.dmsetup("resume", zero)
        # The other pool's device, seen by uuid as the other pool's.
        pb.lib.create_thin("x", MiB)
        witness.write_direct(f"/dev/mapper/{pb.dm('x')}", 0, pattern(1))
        caught(lambda: witness.dmsetup("remove", pb.dm("x")), f"pool {pb.name}'s", "absent")
        # The acting pool's own devices are its own business.
        before = machine.foreign_world()
        p.lib.create_thin("c", MiB)
        machine.check_foreign("p", before, "p's own change")
    finally:
        machine.teardown()
