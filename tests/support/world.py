"""The crowded host of tests/test_stateful_world.py: its model, the world
outside its pools, and how a step runs through each entry point (the
library, a fresh ``Pool.load``, the CLI, the monitor service), killed or
not.  The steps and the checks are the test's own (see its docstring)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import libdm
from support import reliability, witness

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
    "create_thin": (
        "create:intent",
        "create:message",
        "create:transaction",
        "create:activated",
        "create:recorded",
    ),
    "snapshot": (
        "create:intent",
        "snapshot:suspended",
        "create:message",
        "create:transaction",
        "create:activated",
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
            return "ok" + ("" if self.value is None else f" {short(self.value)}")
        return f"error {self.error}: {short(self.text, 400)}"


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


def short(value, limit=300):
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) < limit else text[:limit] + "..."


def run_cmd(*cmd, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def devno(path):
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


class WorldHost:
    """One example's host: two pools with colliding names, the other
    programs' devices and files, and the entry points a step runs through."""

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
        dev = run_cmd("losetup", "--find", "--show", str(path))
        self.loops.append(dev)
        return dev

    def build(self):
        os.makedirs(self.statefs)
        os.makedirs(self.base / "backing")
        os.makedirs(self.base / "other")
        run_cmd(
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
            f"{p}-y", f"0 {FOREIGN_DM} linear {devno(disk)} 0", "OTHERPROG-linear-y"
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
            backing = sysfs_text(f"/sys/block/{os.path.basename(dev)}/loop/backing_file")
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
        shown = short({k: v for k, v in args.items() if k != "directory"})
        self.log.append(f"{pool.key}:{op}({shown}) via {how}{fs}: {out.short()}")
        if out.killed:
            self.stats.kills += 1
            self.stats.killed_ops[op] += 1
            if point:
                self.stats.points[point.split("@")[0]] += 1
        return out


def sysfs_text(path):
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return text[: -len(" (deleted)")] if text.endswith(" (deleted)") else text
