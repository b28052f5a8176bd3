"""The ``libdm`` command's formatting, without a kernel: columns, trees,
JSON of library values, the pool's status and info, error lines."""

import argparse
import json
import pathlib
import pickle
import re

import pytest

import libdm
from libdm.cli import common, device_cmds, output, pool_cmds, thin_cmds
from libdm.thin.status import parse_pool_status

pytestmark = pytest.mark.usefixtures("no_libdm_pool")

MiB = 1 << 20


# -- formatting helpers (no kernel) ------------------------------------------------------


def test_columns_are_aligned():
    text = output.columns([["a", 1, "x"], ["long-name", 100, ""]], ["NAME", "N", "V"], right=(1,))
    assert text == ("NAME         N  V\na            1  x\nlong-name  100\n")
    assert output.columns([]) == ""


def test_pairs_align_their_values():
    assert output.pairs([("Name", "d"), ("Open count", 0)]) == "Name:       d\nOpen count: 0\n"
    assert output.pairs([]) == ""


def test_tree_drawing():
    kids = {"a": ["b", "c"], "b": ["d"], "c": [], "d": [], "e": []}
    text = output.tree(["a", "e"], str.upper, kids.__getitem__)
    assert text == "A\n├─B\n│ └─D\n└─C\nE\n"
    assert output.tree([], str, list) == ""
    # A cycle is drawn once more, not followed.
    loop = {"x": ["y"], "y": ["x"]}
    assert output.tree(["x"], str, loop.__getitem__) == "x\n└─y\n  └─x\n"


def test_json_of_library_values():
    info = libdm.DeviceInfo("d", None, 253, 1, False, True, False, 0, 2, False, 1, False)
    st = parse_pool_status("3 61/512 20/4096 - rw no_discard_passdown queue_if_no_space -")
    data = json.loads(
        output.dumps(
            {
                "info": info,
                "sizes": (libdm.Bytes(5), libdm.Sectors(2)),
                "targets": [libdm.Target(0, 8, "zero")],
                "status": st,
            }
        )
    )
    assert data["info"]["major"] == 253 and data["info"]["uuid"] is None
    assert data["sizes"] == [5, 2]
    assert data["targets"] == [{"start": 0, "length": 8, "type": "zero", "params": ""}]
    assert data["status"]["used_data"] == 20 and data["status"]["held_root"] is None
    assert output.to_jsonable(pathlib.PurePosixPath("/x")) == "/x"
    assert output.size_text(None) == "-" and output.size_text(libdm.Bytes(1536)) == "1.5 KiB"
    assert output.percent(1, 3) == "33.3%" and output.percent(1, 0) == "-"


def test_info_pairs_read_like_dmsetup_info():
    info = libdm.DeviceInfo("d", "U-1", 253, 4, True, True, True, 2, 7, True, 3, True)
    items = dict(device_cmds.info_pairs(info))
    assert items["State"] == "SUSPENDED (READ-ONLY)"
    assert items["Tables present"] == "LIVE & INACTIVE"
    assert items["Major, minor"] == "253, 4" and items["UUID"] == "U-1"
    assert items["Deferred remove"] == "pending" and items["Path"].endswith("/d")
    bare = libdm.DeviceInfo("e", None, 253, 5, False, False, False, 0, 0, False, 0, False)
    items = dict(device_cmds.info_pairs(bare))
    assert items["State"] == "ACTIVE" and items["Tables present"] == "None"
    assert "UUID" not in items and "Deferred remove" not in items


def test_read_table_skips_comments_and_splits_lines():
    targets = device_cmds.read_table(["# a comment\n0 8 zero\n\n", "8 16 linear 7:0 0"])
    assert targets == [libdm.Target(0, 8, "zero"), libdm.Target(8, 16, "linear", "7:0 0")]
    with pytest.raises(ValueError, match="empty"):
        device_cmds.read_table(["", "  # nothing"])


def test_dependency_forest_puts_users_above_what_they_use():
    E = libdm.DeviceEntry
    entries = [E("pool", 253, 0), E("thin1", 253, 1), E("thin2", 253, 2), E("lone", 253, 3)]
    deps = {"pool": [(7, 0), (7, 1)], "thin1": [(253, 0)], "thin2": [(253, 0)], "lone": []}
    notes = {"thin2": {"summary": "thin2, thin id 1, snapshot of thin1"}}
    forest = device_cmds.dependency_forest(entries, deps.__getitem__, notes)
    assert [n["name"] for n in forest] == ["thin1", "thin2", "lone"]
    assert [d["name"] for d in forest[0]["deps"]] == ["pool"]
    assert [(d["major"], d["minor"], d["dm"]) for d in forest[1]["deps"][0]["deps"]] == [
        (7, 0, False),
        (7, 1, False),
    ]
    assert forest[1]["pool"] == notes["thin2"] and "pool" not in forest[0]
    text = output.tree(forest, device_cmds._node_label, lambda n: n["deps"])
    assert text.splitlines()[4] == "thin2 (253:2)  [thin2, thin id 1, snapshot of thin1]"
    assert text.splitlines()[1] == "└─pool (253:0)"


def test_lineage_forest_nests_snapshots_under_their_origin():
    rows = [
        {"name": n, "parent": p, "thin_id": i, "size": MiB, "active": i != 2}
        for i, (n, p) in enumerate(
            [("base", None), ("l1", "base"), ("l2", "l1"), ("other", None), ("l1b", "base")]
        )
    ]
    forest = thin_cmds.lineage_forest(rows)
    assert [n["name"] for n in forest] == ["base", "other"]
    assert [c["name"] for c in forest[0]["children"]] == ["l1", "l1b"]
    assert forest[0]["children"][0]["children"][0]["name"] == "l2"
    text = output.tree(forest, thin_cmds._tree_label, lambda n: n["children"])
    assert text.splitlines()[2] == "│ └─l2  (id 2, 1 MiB, inactive)"


def test_pool_status_and_info_formatting():
    st = parse_pool_status("3 61/512 2048/4096 7 rw no_discard_passdown queue_if_no_space - 64")
    data = pool_cmds.status_json(st, libdm.Bytes(64 << 10))
    assert data["line"] == "3 61/512 2048/4096 7 rw no_discard_passdown queue_if_no_space - 64"
    assert data["used_data_bytes"] == 128 * MiB and data["total_metadata_bytes"] == 2 * MiB
    assert (data["held_root"], data["metadata_low_water_blocks"]) == (7, 64)
    items = dict(pool_cmds.status_pairs(data))
    assert items["Data"] == "128 MiB of 256 MiB used (50.0%); 2048 of 4096 blocks of 64 KiB"
    assert items["Needs check"] == "no" and items["Held metadata root"] == 7
    failed_status = pool_cmds.status_json(parse_pool_status("Fail"), libdm.Bytes(65536))
    assert failed_status == {"failed": True, "state": "Fail", "line": "Fail"}
    assert "thin_repair" in dict(pool_cmds.status_pairs(failed_status))["State"]
    B = libdm.Bytes
    report = libdm.PoolInfo(
        "p",
        B(65536),
        B(MiB),
        "ext4",
        "/d/data",
        "/d/metadata",
        B(0),
        B(4 * MiB),
        B(4 * MiB),
        B(4096),
        B(2 * MiB),
        B(2 * MiB - 4096),
        B(0),
        False,
        True,
        True,
        0,
        "1.02",
        5,
        2,
        "rw",
    )
    data = pool_cmds.info_json(report)
    assert data["Pool Name"] == "p" and data["Base Device Size"] == "1 MiB"
    assert data["bytes"]["data_total"] == 4 * MiB and data["bytes"]["base_device_size"] == MiB
    assert (data["transaction_id"], data["devices"], data["state"]) == (5, 2, "rw")
    json.dumps(data)


def test_a_remedy_is_said_in_each_front_ends_words():
    exc = libdm.DeviceNotBlankError("/dev/x holds swap", "create").advise(
        libdm.Remedy("force", "uses it anyway")
    )
    assert exc.strerror == "/dev/x holds swap; force=True uses it anyway"
    assert (exc.reason, exc.remedy.argument) == ("/dev/x holds swap", "force")
    assert common.error_text(exc) == "/dev/x holds swap; --force uses it anyway [ENOTEMPTY]"
    # Said as an option only to a command that has it.
    has, lacks = argparse.Namespace(force=False), argparse.Namespace(name="x")
    assert common.error_text(exc, has) == common.error_text(exc)
    assert common.error_text(exc, lacks) == "/dev/x holds swap [ENOTEMPTY]"
    # Kept through pickling (errors cross processes in the engines).
    again = pickle.loads(pickle.dumps(exc))
    assert (type(again), again.strerror, again.remedy) == (
        libdm.DeviceNotBlankError,
        exc.strerror,
        exc.remedy,
    )
    plain = libdm.DMError(16, "busy", "remove", "x")
    assert (plain.remedy, common.error_text(plain)) == (None, "busy [EBUSY]")


def test_a_remedy_that_is_another_call_is_said_as_a_method_or_a_command():
    exc = libdm.StateError("pool 'p' holds a change a crash interrupted", "create", "p")
    exc.advise(libdm.RemedyCall("open", "finishes it", "/var/lib/my pool"))
    assert exc.strerror == (
        "pool 'p' holds a change a crash interrupted; Pool.open('/var/lib/my pool') finishes it"
    )
    assert common.error_text(exc) == (
        "pool 'p' holds a change a crash interrupted; "
        "libdm pool open '/var/lib/my pool' finishes it [EUCLEAN]"
    )
    grow = libdm.PoolFullError("the metadata must be at least 1 GiB", "resize", "p").advise(
        libdm.RemedyCall("resize", "grows it first", "/d", (("metadata_size", "1 GiB"),))
    )
    assert grow.strerror.endswith("; Pool.resize(metadata_size='1 GiB') grows it first")
    said = common.error_text(grow, argparse.Namespace(name="x"))
    assert "; libdm pool resize --pool /d --metadata-size '1 GiB' grows it first" in said
    repair = libdm.RemedyCall("repair", "repairs it", "/d")
    assert repair.said() == "Pool.repair() repairs it"
    assert common.command_for(repair) == "libdm pool repair --pool /d"
    deferral = libdm.RemedyCall(
        "configure", "removes it later", "/d", (("deferred_removal", True),)
    )
    assert deferral.said() == "Pool.configure(deferred_removal=True) removes it later"
    assert common.command_for(deferral) == "libdm pool set --pool /d --deferred-removal on"
    again = pickle.loads(pickle.dumps(grow))
    assert (again.strerror, again.remedy) == (grow.strerror, grow.remedy)


def test_the_library_names_no_command_of_the_cli():
    """The library says what to call; only the CLI turns that into a
    command line (its remedies), so a message never tells a Python caller
    to run a shell command.  The CLI itself, the services it runs (the
    monitor service, the snapshotter, the Docker plugin) and docstrings
    may name commands."""
    import ast
    import pathlib

    root = pathlib.Path(libdm.__file__).parent
    commands = re.compile(r"\blibdm (pool|thin|snapshot|device|monitor) [a-z]")
    found = []
    for path in sorted(root.glob("thin/*.py")) + sorted(root.glob("dm/*.py")):
        tree = ast.parse(path.read_text())
        docs = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docs
                and commands.search(node.value)
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert found == []


def test_error_text_names_the_errno_and_the_kernel_reason():
    exc = libdm.DMError(
        22,
        "Invalid argument",
        "message",
        "p",
        (
            "device-mapper: message ioctl on p failed: Invalid argument",
            "kernel: device-mapper: thin: Unrecognised message received: x",
            "kernel: device-mapper: second",
        ),
    )
    assert common.error_text(exc) == (
        "Invalid argument [EINVAL] (kernel: thin: Unrecognised message received: x)"
    )
    assert common.error_text(libdm.DMError(0, "failed", "x")) == "failed"
    assert common.error_text(FileNotFoundError(2, "No such file or directory", "t.txt")) == (
        "t.txt: No such file or directory [ENOENT]"
    )
    assert common.error_text(ValueError("first\nsecond")) == "first"
    assert common.error_text(ValueError()) == "ValueError"
