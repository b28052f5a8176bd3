"""The crowded host's machine (tests/test_stateful_world.py) through fixed
steps: the shortest example of each defect class it is meant to find, and
a check that its checks can fail."""

from __future__ import annotations

import os
import random

import pytest
from support import witness
from support.world import (
    CONTEXT,
    FOREIGN_DM,
    PAGE,
    MiB,
    Stats,
    StepFailed,
    pattern,
    sha,
)
from test_stateful_world import WorldMachine

pytestmark = pytest.mark.kernel

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
