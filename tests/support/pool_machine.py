"""The state machines of tests/test_stateful.py: a loop pool and a block
pool driven through their state-changing API by Hypothesis, some steps
killed in a child process, the model (support/pool_model.py) checked
after every step against the store, the kernel and thin_dump."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

import libdm
from libdm.thin import crash
from libdm.thin.label import RESERVED
from support import reliability, witness
from support.pool_model import (
    BLOCK,
    BLOCK_POINTS_FOR,
    CHILD,
    CHILD_TIMEOUT,
    CONTEXT,
    DATA_SIZE,
    KILL_MODE,
    MAX_DATA,
    MAX_DEVICES,
    MAX_META,
    MAX_ROUNDS,
    MAX_WRITES,
    META_SIZE,
    PAGE,
    POINTS_FOR,
    UNKNOWN,
    WEIGHTS,
    Dev,
    MiB,
    Model,
    StepFailed,
    apply_op,
    describe_page,
    page_runs,
    pattern,
    short,
)

LABEL = int(RESERVED.bytes())  # the start of a block pool's device its label keeps


class LoopPoolMachine(RuleBasedStateMachine):
    """One example: one fresh loop pool and a sequence of steps on it."""

    points_for = POINTS_FOR

    def __init__(self):
        super().__init__()
        self.stats = CONTEXT["stats"]
        self.stats.examples += 1
        n = self.stats.examples
        print(
            f"[{time.strftime('%H:%M:%S')}] {type(self).__name__} example {n}: "
            f"{self.stats.steps} steps, {self.stats.kills} kills so far",
            flush=True,
        )
        self.name = CONTEXT["dm_name"](f"s{n}")
        self.directory = str(CONTEXT["workdir"] / f"s{n}")
        self.pool = None
        self.model = Model(devices={})
        self.counter = 0
        self.tag = n * 100000
        self.writes = 0
        self.log = []  # what this example did, for failure messages

    # -- running operations ------------------------------------------------------------

    def _args(self, **args):
        return dict(args, directory=self.directory)

    def _inline(self, op, args):
        """Run ``op`` here, in a thread given CHILD_TIMEOUT (a hang is a wedge)."""
        out = {}

        def run():
            try:
                out["value"] = apply_op(self.pool, op, args)
                out["ok"] = True
            except Exception as exc:
                out.update(ok=False, type=type(exc).__name__, message=str(exc))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(CHILD_TIMEOUT)
        if thread.is_alive():
            self.stats.wedged += 1
            raise witness.PoolWedged(
                f"pool wedged: {op}({args}) did not return within {CHILD_TIMEOUT:g} s"
            )
        return out

    def _child(self, op, args, point=None, nth=1, delay=None):
        """Run ``op`` in a fresh process, armed to die at ``point`` (its
        ``nth`` time) or SIGKILLed after ``delay`` seconds.  Returns its
        result, or None when it was killed."""
        env = dict(os.environ)
        env.pop("LIBDM_CRASH_AT", None)
        if point is not None:
            env["LIBDM_CRASH_AT"] = f"{point}@{nth}"
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps({"op": op, "args": args})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = proc.stdout.readline()
        if ready.strip() != "ready":
            proc.kill()
            _, err = proc.communicate()
            raise StepFailed(f"the child for {op} did not start: {err.strip()[-2000:]}")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        try:
            if delay is not None:
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.kill()
            out, err = proc.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.stats.wedged += 1
            raise witness.PoolWedged(
                f"pool wedged: {op}({args}) in a child process did not "
                f"finish within {CHILD_TIMEOUT:g} s"
            ) from None
        if proc.returncode == -signal.SIGKILL:
            return None
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise StepFailed(
                f"the child for {op}({args}) exited with {proc.returncode}: {err.strip()[-2000:]}"
            )
        return json.loads(lines[-1])

    def _perform(self, op, args, mode, point_choice, nth, delay_ms, *, child=False):
        """Run one operation in the drawn mode.  Returns (result or None if
        killed, how it was run)."""
        self.stats.ops[op] += 1
        points = self.points_for.get(op, ())
        if mode >= KILL_MODE and points and mode < KILL_MODE + 2:
            point = points[point_choice % len(points)]
            how = f"in a child armed with LIBDM_CRASH_AT={point}@{nth}"
            result = self._child(op, args, point=point, nth=nth)
            if result is None:
                self.stats.points[point] += 1
        elif mode >= KILL_MODE:
            how = f"in a child SIGKILLed after {delay_ms} ms"
            result = self._child(op, args, delay=delay_ms / 1000)
        elif child:
            how = "in a child"
            result = self._child(op, args)
        else:
            how = "in this process"
            result = self._inline(op, args)
        self.log.append(
            f"{op}({short(args)}) {how}: {'KILLED' if result is None else short(result)}"
        )
        if result is None:
            self.stats.kills += 1
            self.stats.killed_ops[op] += 1
            reopened = self._child("open", self._args())
            if reopened is None or not reopened["ok"]:
                raise StepFailed(
                    f"Pool.open in a fresh process after {op} was killed "
                    f"({how}) failed: {short(reopened)}"
                )
        return result, how

    def _step(
        self,
        op,
        args,
        candidates,
        error,
        mode=0,
        point_choice=0,
        nth=1,
        delay_ms=0,
        *,
        child=False,
        loose=(),
        check_result=None,
    ):
        """Run ``op``; ``candidates`` are the model states it may leave
        (the first: nothing happened, the last: all of it), ``error`` the
        exception type name the model expects (then only the first state
        is allowed), ``loose`` device names whose active flag a killed step
        may leave either way."""
        result, how = self._perform(op, args, mode, point_choice, nth, delay_ms, child=child)
        if result is None:
            allowed = candidates
        elif error is not None:
            if result["ok"] or result["type"] != error:
                self._fail(f"{op}({short(args)}) {how}: expected {error}, got {short(result)}")
            allowed = candidates[:1]
            loose = ()
        else:
            if not result["ok"]:
                self._fail(
                    f"{op}({short(args)}) {how} raised {result['type']}: {result['message']}"
                )
            if check_result is not None:
                check_result(result["value"])
            allowed = candidates[-1:]
            loose = ()
        self._settle(allowed, loose, f"{op} {how}")

    # -- checking ----------------------------------------------------------------------

    def _fail(self, message):
        self.stats.failures.append(message)
        raise StepFailed(
            message + f"\nsteps of this example (LIBDM_STATEFUL_SEED="
            f"{CONTEXT.get('seed')}):\n  " + "\n  ".join(self.log)
        )

    def _settle(self, allowed, loose, what):
        """After a step: the pool is healthy, the three witnesses agree, the
        world is exactly one of the ``allowed`` model states, and every
        page written reads back."""
        self.stats.steps += 1
        snap = witness.kernel_snapshot()
        try:
            problems = witness.pool_problems(self.directory, snapshot=snap)
        except witness.PoolWedged as exc:
            self.stats.wedged += 1
            self._fail(f"after {what}: {exc}")
        if problems:
            if any("suspended" in p for p in problems):
                self.stats.wedged += 1
            self._fail(f"after {what}: unhealthy pool: " + "; ".join(problems))
        found = witness.pool_disagreements(self.directory, snapshot=snap)
        if found:
            self.stats.disagreements += len(found)
            self._fail(f"after {what}: store, kernel and thin_dump disagree: " + "; ".join(found))
        observed = self._observe(snap)
        diffs = []
        for i, cand in enumerate(allowed):
            d = self._diff(cand, observed, loose)
            if not d:
                self.model = cand
                break
            diffs.append(f"outcome {i} of {len(allowed)}: " + "; ".join(d))
        else:
            self.stats.disagreements += 1
            self._fail(
                f"after {what}: the pool matches no allowed outcome (a change that "
                f"is not all-or-nothing, or a wrong result):\n    " + "\n    ".join(diffs)
            )
        for name, dev in self.model.devices.items():
            row = observed["devices"][name]
            dev.active = bool(row["active"])
            dev.thin_id = row["thin_id"]
        self._check_content(what)

    def _observe(self, snap):
        state = witness.store_state(self.directory)
        table = witness.parse_pool_table(snap["tables"][self.name][0])
        status = witness.parse_pool_status(snap["statuses"][self.name][0])
        return {
            "devices": {r["name"]: r for r in state["devices"]},
            "txid": state["txid"],
            "config": state["pool"]["config"],
            "table": table,
            "status": status,
            "live": set(snap["infos"]),
            "files": self._backing_sizes(snap),
        }

    def _backing_sizes(self, snap):
        """{"data": bytes, "metadata": bytes} of what backs the pool: here
        its files."""
        return {
            what: os.stat(os.path.join(self.directory, what)).st_size
            for what in ("data", "metadata")
        }

    def _diff(self, model, seen, loose):
        diffs = []
        names = set(seen["devices"])
        if names != set(model.devices):
            diffs.append(f"devices {sorted(names)}, model {sorted(model.devices)}")
        for name, dev in model.devices.items():
            row = seen["devices"].get(name)
            if row is None:
                continue
            if row["size"] * 512 != dev.size:
                diffs.append(f"{name}: size {row['size'] * 512}, model {dev.size}")
            if row["parent"] != dev.parent:
                diffs.append(f"{name}: parent {row['parent']}, model {dev.parent}")
            if dev.thin_id is not None and row["thin_id"] != dev.thin_id:
                diffs.append(f"{name}: thin id {row['thin_id']}, was {dev.thin_id}")
            live = f"{self.name}-{name}" in seen["live"]
            if name not in loose and (bool(row["active"]) != dev.active or live != dev.active):
                diffs.append(
                    f"{name}: store active={row['active']}, live={live}, model active={dev.active}"
                )
        if seen["txid"] != model.txid or seen["status"]["txid"] != model.txid:
            diffs.append(
                f"transaction id: store {seen['txid']}, kernel "
                f"{seen['status']['txid']}, model {model.txid}"
            )
        if seen["files"]["data"] != model.data_size:
            diffs.append(f"data file {seen['files']['data']} bytes, model {model.data_size}")
        if seen["files"]["metadata"] != model.meta_size:
            diffs.append(
                f"metadata file {seen['files']['metadata']} bytes, model {model.meta_size}"
            )
        if seen["table"]["length"] != model.data_sectors:
            diffs.append(
                f"pool table {seen['table']['length']} sectors, model {model.data_sectors}"
            )
        if seen["status"]["total_meta"] != model.meta_blocks:
            diffs.append(
                f"{seen['status']['total_meta']} metadata blocks, model {model.meta_blocks}"
            )
        for what, have in (
            ("table", seen["table"]["low_water_mark"]),
            ("store", seen["config"]["low_water_mark"]),
        ):
            if have != model.lwm:
                diffs.append(f"low water mark {have} in the {what}, model {model.lwm}")
        return diffs

    def _check_content(self, what):
        for name, dev in sorted(self.model.devices.items()):
            if not dev.active:
                continue
            path = f"/dev/mapper/{self.name}-{name}"
            pages = sorted(p for p, t in dev.pages.items() if t != UNKNOWN)
            unwritten = next(i for i in range(dev.size // PAGE + 1) if i not in dev.pages)
            if unwritten < dev.size // PAGE:
                pages.append(unwritten)
                pages.sort()
            for first, count in page_runs(pages):
                try:
                    data = witness.read_direct(path, first * PAGE, count * PAGE)
                except witness.PoolWedged as exc:
                    self.stats.wedged += 1
                    self._fail(f"after {what}: {exc}")
                for i in range(count):
                    page = first + i
                    got = data[i * PAGE : (i + 1) * PAGE]
                    tag = dev.pages.get(page)
                    want = bytes(PAGE) if tag is None else pattern(tag)
                    if got != want:
                        self.stats.losses += 1
                        self._fail(
                            f"after {what}: {name} page {page} holds "
                            f"{describe_page(got)}, expected "
                            f"{'zeros' if tag is None else f'write #{tag}'}"
                        )

    def teardown(self):
        if self.pool is None:
            return
        try:
            pool = libdm.Pool.load(self.directory)
            pool.destroy(remove_files=True)
        except Exception:
            # A wedged pool: resume it so the harness can remove it.
            for dm in (self.name,):
                witness.dmsetup("resume", dm, check=False)
            # On failure the test's cleanup removes what is left.
            with contextlib.suppress(Exception):
                libdm.Pool.load(self.directory).destroy(remove_files=True)
        finally:
            self.pool.close()

    # -- the steps --------------------------------------------------------------------

    @initialize()
    def create_pool(self):
        kill = 4 if CONTEXT["rnd"].random() < 0.15 else 0  # at pool:created
        args = self._args(name=self.name, data=DATA_SIZE, meta=META_SIZE)
        if kill == 4:
            self._step("create_pool", args, [self.model.copy()], None, mode=KILL_MODE, child=True)
        else:
            self._step("create_pool", args, [self.model.copy()], None)
        self.pool = libdm.Pool.load(self.directory)

    def _new_name(self):
        self.counter += 1
        return f"d{self.counter}"

    @rule(data=st.data())
    def step(self, data):
        """One step: an operation picked by WEIGHTS (the first one possible
        from there on), run in the drawn mode.

        Every choice comes from the run's own Random (seeded from
        LIBDM_STATEFUL_SEED or at random, and printed): hypothesis's draws
        lean hard to their simplest values (the same operation, no kill),
        and a timed kill does not replay anyway.  The failure message lists
        every step as it was run, which is the reproducer."""
        self.rnd = rnd = CONTEXT["rnd"]
        mode, point = rnd.randint(0, 19), rnd.randint(0, 4)
        nth, delay = rnd.randint(1, 2), rnd.randint(0, 60)
        if self.stats.steps >= CONTEXT["steps"] and self.stats.kills >= CONTEXT["kills"]:
            return  # the run has what it came for: the examples left end early
        devices = self.model.devices
        possible = {
            "write": self.writes < MAX_WRITES and any(d.active for d in devices.values()),
            "overwrite": self.writes < MAX_WRITES
            and any(d.active and d.pages for d in devices.values()),
            "create_thin": len(devices) < MAX_DEVICES,
            "snapshot": 0 < len(devices) < MAX_DEVICES,
            "delete": bool(devices),
            "activate_or_deactivate": bool(devices),
            "resize_thin": bool(devices),
            "grow_or_tune": True,
            "reopen_or_restart": True,
        }
        # Through a seeded Random: hypothesis's draws of small ranges lean
        # hard to their first values, which would favour the first kinds.
        names = [n for n, w in WEIGHTS for _ in range(w)]
        pick = rnd.randrange(len(names))
        op = next(
            names[(pick + i) % len(names)]
            for i in range(len(names))
            if possible[names[(pick + i) % len(names)]]
        )
        if op == "write":
            self.write(data, self.rnd.choice([1, 3, 16]), self.rnd.randint(0, 10**6))
        elif op == "overwrite":
            self.overwrite(data, self.rnd.choice([1, 2, 16]))
        elif op == "create_thin":
            self.create_thin(
                data,
                self.rnd.choice([4 * MiB, 8 * MiB]),
                self.rnd.randint(0, 9),
                mode,
                point,
                delay,
            )
        elif op == "snapshot":
            self.snapshot(data, mode, point, delay)
        elif op == "delete":
            self.delete(data, mode, point, delay)
        elif op == "resize_thin":
            self.resize_thin(
                data,
                self.rnd.choice([BLOCK, PAGE, MiB, 0, -BLOCK, -MiB]),
                (self.rnd.random() < 0.5),
                mode,
                point,
                delay,
            )
        elif op == "activate_or_deactivate":
            self.activate_or_deactivate(data, (self.rnd.random() < 0.5), mode, delay)
        elif op == "grow_or_tune":
            self.grow_or_tune(
                data,
                self.rnd.choice(["resize", "refresh", "set_low_water_mark", "monitor"]),
                mode,
                point % 4,
                nth,
                delay,
            )
        else:
            self.reopen_or_restart((self.rnd.random() < 0.5), mode, delay * 3)

    def create_thin(self, data, size, taken, mode, point, delay):
        before = self.model.copy()
        if taken == 9 and before.devices:
            name = self.rnd.choice(sorted(before.devices))
            self._step(
                "create_thin",
                self._args(name=name, size=size),
                [before],
                "DeviceExistsError",
                mode,
                point,
                1,
                delay,
            )
            return
        name = self._new_name()
        after = before.copy()
        after.devices[name] = Dev(size, None, True)
        after.txid += 1
        self._step(
            "create_thin",
            self._args(name=name, size=size),
            [before, after],
            None,
            mode,
            point,
            1,
            delay,
        )

    def snapshot(self, data, mode, point, delay):
        before = self.model.copy()
        origin = self.rnd.choice(sorted(before.devices))
        name = self._new_name()
        after = before.copy()
        src = after.devices[origin]
        after.devices[name] = Dev(src.size, origin, True, dict(src.pages))
        after.txid += 1
        self._step(
            "snapshot",
            self._args(origin=origin, name=name),
            [before, after],
            None,
            mode,
            point,
            1,
            delay,
        )

    def delete(self, data, mode, point, delay):
        before = self.model.copy()
        name = self.rnd.choice(sorted(before.devices))
        # An origin may go before its snapshots (as the kernel and LVM allow):
        # they become roots and keep their data.
        after = before.copy()
        del after.devices[name]
        for dev in after.devices.values():
            if dev.parent == name:
                dev.parent = None
        after.txid += 1
        # A delete killed before its intent was recorded has already
        # deactivated the device: it is still there, active or not.
        self._step(
            "delete",
            self._args(name=name),
            [before, after],
            None,
            mode,
            point,
            1,
            delay,
            loose=(name,),
        )

    def resize_thin(self, data, by, force, mode, point, delay):
        """ThinDevice.resize: grow, or shrink (force) to whole data blocks.
        What a shrink cuts off is discarded when the device is live, so it
        reads as zeros if the device grows again."""
        before = self.model.copy()
        name = self.rnd.choice(sorted(before.devices))
        old = before.devices[name].size
        new = old + by if by >= 0 else max(BLOCK, (old + by) // BLOCK * BLOCK)
        if new > 16 * MiB:
            new = old
        args = self._args(name=name, size=new, force=force)
        if new < old and not force:
            self._step("resize_thin", args, [before], "ValueError", mode, point, 1, delay)
            return
        after = before.copy()
        dev = after.devices[name]
        dev.size = new
        if new < old:
            cut = new // PAGE
            for page in [p for p in dev.pages if p >= cut]:
                if dev.active:
                    del dev.pages[page]  # discarded: zeros from now on
                else:
                    dev.pages[page] = UNKNOWN  # an inactive device is not discarded
            # Killed midway, the cut-off part may be discarded already.
            for page in [p for p in before.devices[name].pages if p >= cut]:
                before.devices[name].pages[page] = UNKNOWN
        self._step("resize_thin", args, [before, after], None, mode, point, 1, delay)

    def activate_or_deactivate(self, data, active, mode, delay):
        before = self.model.copy()
        name = self.rnd.choice(sorted(before.devices))
        after = before.copy()
        after.devices[name].active = active
        self._step(
            "activate" if active else "deactivate",
            self._args(name=name),
            [before, after],
            None,
            mode,
            0,
            1,
            delay,
            loose=(name,),
        )

    def grow_or_tune(self, data, which, mode, point, nth, delay):
        """resize (data, metadata), refresh, set_low_water_mark or one
        monitor growth step: the pool reloads of every kind."""
        if which == "resize":
            self.resize(
                self.rnd.choice([None, 0, BLOCK, 3 * BLOCK + PAGE, 8 * MiB + 512, -BLOCK]),
                self.rnd.choice([None, 0, PAGE, 1 * MiB, 512, -PAGE]),
                mode,
                point,
                nth,
                delay,
            )
        elif which == "refresh":
            self.refresh(mode, point, delay)
        elif which == "set_low_water_mark":
            self.set_low_water_mark(
                self.rnd.choice([0, 1, 7, 100, 1023, 5000, -1]), mode, point, delay
            )
        else:
            self.monitor_growth(
                self.rnd.choice([1, 2, 5, 50, 90]),
                self.rnd.choice([1, 10, 25]),
                self.rnd.choice([5, 10, 20, 99]),
                mode,
                point,
                nth,
                delay,
            )

    def resize(self, grow_data, grow_meta, mode, point, nth, delay):
        before = self.model.copy()
        data = None if grow_data is None else before.data_size + grow_data
        meta = None if grow_meta is None else before.meta_size + grow_meta
        if (data or 0) > MAX_DATA or (meta or 0) > MAX_META:
            data = meta = None  # keep the files small: a resize to the same sizes
        args = self._args(data=data, meta=meta)
        if (data is not None and data < before.data_size) or (
            meta is not None and meta < before.meta_size
        ):
            self._step("resize", args, [before], "ValueError", mode, point, nth, delay)
            return
        after = before.copy()
        after.data_size = before.data_size if data is None else data
        after.meta_size = before.meta_size if meta is None else meta
        # Both at once is two growths, metadata first (the kernel grows data
        # before metadata on a resume): a kill between them keeps the first.
        meta_first = before.copy()
        meta_first.meta_size = after.meta_size
        self._step("resize", args, [before, meta_first, after], None, mode, point, nth, delay)

    def refresh(self, mode, point, delay):
        before = self.model.copy()
        self._step("refresh", self._args(), [before], None, mode, point, 1, delay)

    def set_low_water_mark(self, blocks, mode, point, delay):
        before = self.model.copy()
        if blocks < 0:
            self._step(
                "set_low_water_mark",
                self._args(blocks=blocks),
                [before],
                "ValueError",
                mode,
                point,
                1,
                delay,
            )
            return
        after = before.copy()
        after.lwm = blocks
        self._step(
            "set_low_water_mark",
            self._args(blocks=blocks),
            [before, after],
            None,
            mode,
            point,
            1,
            delay,
        )

    def monitor_growth(self, threshold, percent, meta_threshold, mode, point, nth, delay):
        """One check of an autoextend monitor (Monitor.check), predicted from
        the kernel's usage (dmsetup status) just before it."""
        before = self.model.copy()
        if before.data_size >= MAX_DATA or before.meta_size >= MAX_META:
            threshold, meta_threshold = 99, 99  # nothing to grow: the files stay small
        status = witness.parse_pool_status(witness.status(self.name)[0])
        states, expected = [before], []
        cur = before
        data_pct = 100.0 * status["used_data"] / max(status["total_data"], 1)
        if data_pct >= threshold:
            old = cur.data_sectors * 512
            want = -(-(old + old * percent // 100) // BLOCK) * BLOCK
            cur = cur.copy()
            cur.data_size = want
            states.append(cur)
            cur = cur.copy()
            cur.lwm = (want // BLOCK) * (100 - threshold) // 100
            states.append(cur)
            expected.append(["data", old, want, None])
        meta_pct = 100.0 * status["used_meta"] / max(status["total_meta"], 1)
        if meta_pct >= meta_threshold:
            old = status["total_meta"] * 4096
            want = -(-(old + old * percent // 100) // 4096) * 4096
            cur = cur.copy()
            cur.meta_size = want
            states.append(cur)
            expected.append(["metadata", old, want, None])

        def check_result(value):
            if value != expected:
                self._fail(
                    f"monitor check returned {value}, expected {expected} (usage "
                    f"{status['used_data']}/{status['total_data']} data, "
                    f"{status['used_meta']}/{status['total_meta']} metadata)"
                )

        args = self._args(threshold=threshold, percent=percent, meta_threshold=meta_threshold)
        self._step(
            "monitor", args, states, None, mode, point, nth, delay, check_result=check_result
        )

    def reopen_or_restart(self, restart, mode, delay):
        if restart:
            self.restart(mode, delay)
        else:
            self.reopen(mode, delay)

    def reopen(self, mode, delay):
        """Pool.open in a fresh process (this process's Pool stays, as a
        second user would)."""
        before = self.model.copy()
        self._step("reopen", self._args(), [before], None, mode, 0, 1, delay, child=True)

    def restart(self, mode, delay):
        """Tear every device down (Pool.destroy, files kept) in a child, then
        Pool.open in a fresh process, as after a reboot."""
        before = self.model.copy()
        result, how = self._perform("restart", self._args(), mode, 0, 1, delay, child=True)
        if result is not None:
            if not result["ok"]:
                self._fail(f"restart {how}: destroy raised {short(result)}")
            reopened = self._child("open", self._args())
            if not reopened["ok"]:
                self._fail(f"Pool.open after destroy failed: {short(reopened)}")
        self._settle([before], (), f"restart {how}")

    def write(self, data, pages, where):
        """Write a known pattern (O_DIRECT, then fsync) to an active device."""
        active = sorted(n for n, d in self.model.devices.items() if d.active)
        name = self.rnd.choice(list(active))
        dev = self.model.devices[name]
        self._write(name, where % (dev.size // PAGE - pages + 1), pages)

    def overwrite(self, data, pages):
        """Write over pages written before (shared with snapshots, maybe)."""
        names = sorted(n for n, d in self.model.devices.items() if d.active and d.pages)
        name = self.rnd.choice(list(names))
        dev = self.model.devices[name]
        first = self.rnd.choice(sorted(dev.pages))
        self._write(name, min(first, dev.size // PAGE - pages), pages)

    def _write(self, name, first, pages):
        dev = self.model.devices[name]
        self.writes += 1
        tags = []
        for _ in range(pages):
            self.tag += 1
            tags.append(self.tag)
        payload = b"".join(pattern(t) for t in tags)
        self.stats.ops["write"] += 1
        self.log.append(f"write({name}, pages {first}+{pages}, #{tags[0]}..)")
        try:
            witness.write_direct(f"/dev/mapper/{self.name}-{name}", first * PAGE, payload)
        except witness.PoolWedged as exc:
            self.stats.wedged += 1
            self._fail(str(exc))
        for i, t in enumerate(tags):
            dev.pages[first + i] = t
        self._settle([self.model.copy()], (), f"write to {name}")


def run_machine(machine, steps, kills, per_example, operations, points_for):
    """Run ``machine`` in rounds of examples until it made ``steps`` steps
    and ``kills`` kills; record the figures (also when it fails)."""
    stats = CONTEXT["stats"]
    seed = int(os.environ.get("LIBDM_STATEFUL_SEED") or int.from_bytes(os.urandom(4), "big"))
    print(f"\n{machine.__name__}: LIBDM_STATEFUL_SEED={seed}")
    CONTEXT.update(steps=steps, kills=kills, rnd=random.Random(seed), seed=seed)
    rounds = 0
    try:
        while stats.steps < steps or stats.kills < kills:
            rounds += 1
            assert rounds <= MAX_ROUNDS, (
                f"{rounds - 1} rounds made only {stats.steps} steps and {stats.kills} kills "
                f"(wanted {steps} and {kills})"
            )
            left = max(steps - stats.steps, per_example)
            examples = max(1, -(-left * 10 // (per_example * 8)))
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=examples,
                    stateful_step_count=per_example,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                    print_blob=True,
                    # No shrinking: a timed kill does not replay exactly, and every
                    # example costs seconds; the failure message lists the steps.
                    phases=(Phase.explicit, Phase.generate),
                ),
            )
    finally:
        reached = set(stats.points)
        wanted = {p for points in points_for.values() for p in points}
        ops = sorted(stats.ops)
        reliability.record(
            "stateful",
            steps=stats.steps,
            kills=stats.kills,
            examples=stats.examples,
            losses=stats.losses,
            disagreements=stats.disagreements,
            wedged=stats.wedged,
            operations=ops,
            killed_operations=sorted(stats.killed_ops),
            crash_points_reached=sorted(reached),
            gaps=reliability.gaps(operations, ops) + reliability.gaps(wanted, reached),
        )
        print(
            f"\n{machine.__name__}: {stats.steps} steps in {stats.examples} examples, "
            f"{stats.kills} kills; operations {dict(stats.ops)}; killed "
            f"{dict(stats.killed_ops)}; crash points fired {dict(stats.points)}; "
            f"never fired: {sorted(wanted - reached)}"
        )
    assert set(crash.POINTS) >= wanted


class BlockPoolMachine(LoopPoolMachine):
    """The same model over a block pool: two loop devices made here with
    losetup (Pool.create), grown by Pool.extend onto more of them, data or
    metadata; resize is refused (a loop pool's call)."""

    points_for = BLOCK_POINTS_FOR

    def __init__(self):
        super().__init__()
        self.loops = []

    def _losetup(self, size):
        path = os.path.join(
            str(CONTEXT["workdir"]), f"{os.path.basename(self.directory)}-{len(self.loops)}"
        )
        with open(path, "wb") as fh:
            fh.truncate(size)
        dev = subprocess.run(
            ["losetup", "--find", "--show", path], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.loops.append(dev)
        return dev

    def _backing_sizes(self, snap):
        """The lengths of ``-tdata`` and ``-tmeta`` (dmsetup)."""
        return {
            what: sum(
                int(line.split()[1]) for line in snap["tables"].get(f"{self.name}-{piece}", [])
            )
            * 512
            for what, piece in (("data", "tdata"), ("metadata", "tmeta"))
        }

    def teardown(self):
        try:
            super().teardown()
        finally:
            for dev in self.loops:
                subprocess.run(["losetup", "-d", dev], capture_output=True)

    @initialize()
    def create_pool(self):
        kill = 4 if CONTEXT["rnd"].random() < 0.15 else 0  # at pool:created
        data, meta = self._losetup(DATA_SIZE), self._losetup(4 * MiB)
        # Each device's first MiB holds the pool's label, not pool space.
        self.model.data_size = DATA_SIZE - LABEL
        self.model.meta_size = 4 * MiB - LABEL
        args = self._args(name=self.name, data=data, meta=meta)
        self._step(
            "create_block_pool",
            args,
            [self.model.copy()],
            None,
            mode=KILL_MODE if kill == 4 else 0,
            child=kill == 4,
        )
        self.pool = libdm.Pool.load(self.directory)

    def grow_or_tune(self, data, which, mode, point, nth, delay):
        """extend (data or metadata) in place of monitor growth, and a resize
        that must be refused."""
        if which == "monitor":
            which = "extend"
        if which == "extend":
            self.extend(
                (self.rnd.random() < 0.5),
                self.rnd.choice([8 * MiB, 8 * MiB + 512, LABEL + BLOCK]),
                mode,
                point,
                nth,
                delay,
            )
        elif which == "resize":
            before = self.model.copy()
            self._step(
                "resize",
                self._args(data=before.data_size + BLOCK, meta=None),
                [before],
                "RefusedError",
                mode,
                point,
                nth,
                delay,
            )
        else:
            super().grow_or_tune(data, which, mode, point, nth, delay)

    def extend(self, metadata, size, mode, point, nth, delay):
        before = self.model.copy()
        if len(self.loops) >= 8 or before.data_size >= MAX_DATA:
            self.refresh(mode, point, delay)
            return
        device = self._losetup(size)
        after = before.copy()
        if metadata:
            after.meta_size += size - LABEL
        else:
            after.data_size += size - LABEL
        self._step(
            "extend",
            self._args(device=device, metadata=metadata),
            [before, after],
            None,
            mode,
            point,
            nth,
            delay,
        )
