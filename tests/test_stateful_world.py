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
under "stateful world".  tests/test_world_examples.py runs the same
machine through fixed steps: the shortest example of each defect class
it is meant to find.  The host, its model and its entry points are in
tests/support/world.py; the steps and the checks are here.
"""

from __future__ import annotations

import copy
import os
import random
import re

import pytest
from support import reliability, witness
from support.world import (
    BLOCK,
    CONTEXT,
    ENTRIES,
    FOREIGN_DM,
    HOSTILE_WORDS,
    MAX_DEVICES,
    MAX_EXAMPLES,
    MAX_SQUATTERS,
    MAX_WRITES,
    NAMES,
    PAGE,
    POINTS_FOR,
    STEPS_PER_EXAMPLE,
    TOTAL_KILLS,
    TOTAL_STEPS,
    UNKNOWN,
    Dev,
    KiB,
    MiB,
    Stats,
    WorldHost,
    describe_page,
    devno,
    pattern,
    run_cmd,
    sha,
    short,
)

import libdm
from libdm.thin import crash

pytestmark = pytest.mark.kernel


class WorldMachine(WorldHost):
    """One example: a fresh crowded host with two pools, and steps on it."""

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
                f"{what}\n  the listing {short(value, 600)} matches none of "
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
            f"0 {FOREIGN_DM} linear {devno(self.foreign_disk)} {offset}",
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
            run_cmd("mount", "-o", "remount,rw", str(self.statefs))
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
            run_cmd("mount", "-o", "remount,ro", str(self.statefs))
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
