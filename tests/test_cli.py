"""The ``libdm`` command.

Without a kernel: argument parsing, ``--help`` of every command, exit
statuses and one-line errors for bad usage, and the JSON and text
formatting helpers.  In a kernel: every command, run both in-process
through ``libdm.cli.main`` and as ``python -m libdm``, checked against
dmsetup, losetup and thin_dump (never against libdm itself), with its
JSON parsed back, and one failure per command.
"""

import contextlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
from support import witness
from support.blockio import attach, devno

import libdm
from libdm import cli
from libdm.cli import common, device_cmds, output, pool_cmds, thin_cmds
from libdm.cli.parser import build_parser
from libdm.thin.status import parse_pool_status

kernel = pytest.mark.kernel

MiB = 1 << 20
Result = namedtuple("Result", "code out err")


# -- running the command -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_pool_from_the_environment(monkeypatch):
    monkeypatch.delenv("LIBDM_POOL", raising=False)


def run(*args, stdin=None):
    """``libdm ARGS`` in this process (so coverage sees it)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    finally:
        sys.stdin = saved
    return Result(code, out.getvalue(), err.getvalue())


def sh(*args, stdin=None, env=None):
    """``python -m libdm ARGS`` as a process of its own."""
    environ = {k: v for k, v in os.environ.items() if k != "LIBDM_POOL"}
    environ.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "libdm", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        env=environ,
        timeout=300,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(params=["in-process", "subprocess"])
def cli_run(request):
    return run if request.param == "in-process" else sh


def ok(result):
    assert result.code == 0, f"exit {result.code}: {result.err}"
    return result


def failed(result, code, *words):
    """The command failed with ``code``, one line on stderr naming ``words``,
    no traceback and nothing on stdout; returns the line."""
    assert result.code == code, result
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("libdm: "), lines[0]
    assert "Traceback" not in result.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.out == ""
    return lines[0]


def as_json(result):
    return json.loads(ok(result).out)


COMMANDS = sorted(build_parser(width=80).commands)


# -- parsing and help (no kernel) ------------------------------------------------------


def test_every_command_is_there():
    assert set(COMMANDS) == {
        "create",
        "reload",
        "suspend",
        "resume",
        "remove",
        "info",
        "table",
        "status",
        "message",
        "ls",
        "version",
        "targets",
        "pool",
        "pool create",
        "pool info",
        "pool status",
        "pool resize",
        "pool extend",
        "pool refresh",
        "pool monitor",
        "pool open",
        "pool destroy",
        "pool trim",
        "pool set",
        "pool repair",
        "pool adopt",
        "pool hand-over",
        "thin",
        "thin create",
        "thin snapshot",
        "thin delete",
        "thin activate",
        "thin deactivate",
        "thin ls",
        "thin resize",
        "monitor",
        "monitor serve",
        "monitor register",
        "monitor unregister",
        "monitor ls",
    } | {c for c in COMMANDS if c.startswith(("snapshotter", "docker"))}


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_exits_0_with_an_example(command):
    r = run(*command.split(), "--help")
    assert r.code == 0 and r.err == ""
    assert r.out.startswith(f"usage: libdm {command}".rstrip())
    assert "Example" in r.out


def test_help_through_python_m():
    r = sh("--help")
    assert r.code == 0 and "Example" in r.out and "pool" in r.out


def parse(*args):
    return build_parser(width=80).parse_args(list(args))


def test_parsing_tables_sizes_and_flags():
    a = parse("create", "d", "--table", "0 8 zero", "--table", "8 8 error", "--readonly")
    assert (a.name, a.table, a.table_file, a.readonly, a.uuid) == (
        "d",
        ["0 8 zero", "8 8 error"],
        None,
        True,
        None,
    )
    assert a.func is device_cmds.cmd_create and a.command == "create"
    a = parse("thin", "create", "web", "1.5G")
    assert a.size == libdm.Bytes(3 << 29) and a.command == "thin create"
    a = parse("pool", "create", "p", "--loop", "d", "--data-size", "1G")
    assert a.block_size == libdm.Bytes(64 << 10) and a.min_free_space == 10
    assert a.feature == [] and a.data_size == libdm.Bytes(1 << 30)
    a = parse("message", "d", "0", "set_transaction_id", "1", "2")
    assert (a.sector, a.message) == (0, ["set_transaction_id", "1", "2"])
    a = parse("remove", "d")
    assert (a.retries, a.deferred) == (5, False)
    a = parse("suspend", "d", "--noflush", "--nolockfs")
    assert a.noflush and a.nolockfs
    a = parse("pool", "monitor", "--spare", "/dev/a", "--spare", "/dev/b", "--iterations", "3")
    assert (a.spare, a.iterations, a.threshold, a.percent, a.interval) == (
        ["/dev/a", "/dev/b"],
        3,
        80,
        20,
        10.0,
    )


def test_global_options_go_before_or_after_the_command():
    assert parse("--json", "info", "d").json is True
    assert parse("info", "d", "--json").json is True
    assert parse("info", "d").json is False
    assert parse("--pool", "/a", "thin", "ls").pool == "/a"
    assert parse("thin", "ls", "--pool", "/b").pool == "/b"
    assert parse("--pool", "/a", "thin", "ls", "--pool", "/b").pool == "/b"
    assert parse("--debug", "version").debug is True
    assert parse("version", "--debug").debug is True


def test_the_pool_comes_from_the_environment(monkeypatch):
    args = parse("thin", "ls")
    with pytest.raises(cli.parser.UsageError, match="LIBDM_POOL"):
        common.pool_directory(args)
    monkeypatch.setenv("LIBDM_POOL", "/env/pool")
    assert common.pool_directory(args) == "/env/pool"
    assert common.pool_directory(parse("thin", "ls", "--pool", "/given")) == "/given"


@pytest.mark.parametrize(
    "args, words",
    [
        ([], ["required: COMMAND"]),
        (["frobnicate"], ["invalid choice"]),
        (["create", "d"], ["create:", "--table"]),
        (["create", "d", "--table", "0 8 zero", "--table-file", "f"], ["not allowed"]),
        (["remove", "d", "--retries", "-1"], ["remove:", "-1"]),
        (["message", "d", "x", "hello"], ["message:", "'x'"]),
        (["thin", "create", "web", "10X"], ["thin create:", "'10X' is not a size"]),
        (["thin", "create", "web", "100"], ["thin create:", "512-byte sectors"]),
        (["pool", "create", "p"], ["pool create:", "--loop"]),
        (["pool", "create", "p", "--loop", "d"], ["--loop needs --data-size"]),
        (
            ["pool", "create", "p", "--loop", "d", "--data-size", "1G", "--force"],
            ["--force cannot be used with --loop"],
        ),
        (
            ["pool", "create", "p", "--data", "/dev/x", "--state-dir", "s"],
            ["--data needs --metadata"],
        ),
        (["pool", "create", "p", "--device", "/dev/x"], ["--device needs --state-dir"]),
        (
            ["pool", "create", "p", "--device", "/dev/x", "--state-dir", "s", "--data-size", "1G"],
            ["--data-size cannot be used with --device"],
        ),
        (
            ["pool", "create", "p", "--loop", "d", "--data-size", "1G", "--min-free-space", "101"],
            ["not a percentage"],
        ),
        (["pool", "monitor", "--threshold", "x"], ["not a whole percentage"]),
        (["pool", "monitor", "--interval", "0"], ["more than 0 seconds"]),
        (["pool", "resize", "--pool", "/p"], ["give the new data SIZE"]),
        (["thin", "ls"], ["no pool given"]),
        (["version", "extra"], ["unrecognized arguments: extra"]),
        (["targets", "extra"], ["unrecognized arguments: extra"]),
    ],
)
def test_bad_usage_exits_2_with_one_line(args, words):
    failed(run(*args), 2, *words)


@pytest.mark.parametrize(
    "args, words",
    [
        (["info", "bad/name"], ["info bad/name:", "must not contain '/'"]),
        (["create", "bad name", "--table", "0 8 zero"], ["whitespace"]),
        (["create", "d", "--table", "0 x zero"], ["create d:", "not a whole number of sectors"]),
        (["create", "d", "--table", "# only a comment"], ["the table is empty"]),
        (["reload", "d", "--table", "8 8 zero"], ["starts at sector 8"]),
        (["message", "d", "0", "   "], ["message must not be empty"]),
        (["suspend", "x" * 200], ["at most 127"]),
        (["resume", ".."], ["must not be '.' or '..'"]),
        (["remove", "a/b"], ["'/'"]),
        (["table", "a b"], ["whitespace"]),
        (["status", ""], ["must not be empty"]),
    ],
)
def test_validation_errors_exit_2_before_any_ioctl(args, words):
    failed(run(*args), 2, *words)


def test_a_missing_pool_state_exits_1(tmp_path):
    line = failed(
        run("thin", "ls", "--pool", tmp_path), 1, "thin ls:", "state.db is missing", "[EUCLEAN]"
    )
    assert str(tmp_path) in line
    failed(run("pool", "info", "--pool", tmp_path / "nowhere"), 1, "no pool state")


def test_usage_errors_through_python_m():
    failed(sh("thin", "create", "a", "10X", "--pool", "/nowhere"), 2, "'10X' is not a size")
    failed(sh("info", "bad/name"), 2, "info bad/name:")


def test_debug_shows_the_traceback():
    r = run("--debug", "info", "bad/name")
    assert r.code == 2 and "Traceback" in r.err and "ValueError" in r.err
    assert r.err.splitlines()[-1].startswith("libdm: info bad/name: ")


def test_an_unexpected_error_is_one_line_and_exit_1(monkeypatch):
    def boom():
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(libdm, "library_version", boom)
    line = failed(run("version"), 1, "unexpected RuntimeError: boom", "--debug")
    assert "second line" not in line


@pytest.mark.parametrize(
    "error",
    [
        TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'"),
        AttributeError("'NoneType' object has no attribute 'name'"),
        KeyError("data_size"),
        RuntimeError("boom"),
    ],
)
def test_a_library_bug_is_not_bad_usage(monkeypatch, error):
    def buggy():
        raise error

    monkeypatch.setattr(libdm, "library_version", buggy)
    line = failed(
        run("version"),
        1,
        f"version: unexpected {type(error).__name__}",
        "a bug in libdm",
        "--debug",
    )
    assert "bad usage" not in line and "see 'libdm" not in line
    r = run("--debug", "version")
    assert r.code == 1 and "Traceback" in r.err and type(error).__name__ in r.err
    assert "a bug in libdm" in r.err.splitlines()[-1]


def test_a_state_error_is_a_failure_not_bad_usage(monkeypatch):
    def corrupt():
        raise libdm.StateError("/x/state.db: the stored pool configuration is empty", "open")

    monkeypatch.setattr(libdm, "library_version", corrupt)
    failed(run("version"), 1, "version:", "configuration is empty", "[EUCLEAN]")


def test_an_unreadable_store_is_a_failure_not_bad_usage(monkeypatch):
    # What a store gives before it says StateError itself: JSON or SQLite
    # errors about the data, not about the command line.
    import sqlite3

    for error in (
        json.JSONDecodeError("Expecting value", "not json", 0),
        sqlite3.DatabaseError("file is not a database"),
    ):

        def unreadable(error=error):
            raise error

        monkeypatch.setattr(libdm, "library_version", unreadable)
        line = failed(run("version"), 1, "version: unreadable stored state:")
        assert "bug" not in line


def test_too_large_a_size_is_bad_usage_not_an_overflow():
    for size in (str(2**63 * 512), f"{2**63}s", "8192P"):
        failed(
            run("pool", "create", "p", "--loop", "/nowhere", "--data-size", size),
            2,
            "too large",
            "8 EiB",
        )
    failed(run("thin", "create", "v", str(2**63 * 512), "--pool", "/nowhere"), 2, "too large")
    failed(run("thin", "create", "v", "\u0661\u0660M", "--pool", "/nowhere"), 2, "non-ASCII")


def test_an_interrupt_exits_130_and_a_closed_pipe_quietly_1(monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(libdm, "library_version", interrupted)
    failed(run("version"), 130, "version: interrupted")

    def closed():
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(libdm, "library_version", closed)
    assert run("version") == (1, "", "")


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


def test_library_advice_in_cli_words():
    exc = libdm.DeviceNotBlankError("/dev/x holds swap; pass force=True to use it", "create")
    assert common.in_cli_words(exc, pool_cmds.FORCE) is exc
    assert exc.strerror == "/dev/x holds swap; pass --force to use it"
    other = ValueError("pass force=True")
    assert str(common.in_cli_words(other, pool_cmds.FORCE)) == "pass force=True"


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


# -- device commands (kernel) -------------------------------------------------------------


def dmsetup_state(name):
    """Attributes of ``dmsetup info -c``: L live, I inactive, s suspended, r read-only."""
    return witness.info(name)["attr"]


@kernel
def test_device_commands_against_dmsetup(cli_run, dm_name):
    name = dm_name("dev")
    r = ok(
        cli_run(
            "create",
            name,
            "--table",
            "0 2048 zero",
            "--table",
            "2048 8 error",
            "--uuid",
            f"{name}-uuid",
        )
    )
    assert r.out == f"/dev/mapper/{name}\n"
    assert witness.table(name) == ["0 2048 zero", "2048 8 error"]
    seen = witness.info(name)

    data = as_json(cli_run("info", name, "--json"))
    assert (data["name"], data["uuid"], data["major"], data["minor"]) == (
        name,
        f"{name}-uuid",
        seen["major"],
        seen["minor"],
    )
    assert (data["open_count"], data["target_count"], data["event_nr"]) == (
        seen["open"],
        seen["segments"],
        seen["events"],
    )
    assert data["live_table"] and not data["suspended"] and not data["read_only"]
    assert seen["attr"] == "L--w"
    text = ok(cli_run("info", name)).out
    assert f"Major, minor:      {seen['major']}, {seen['minor']}\n" in text
    assert "State:             ACTIVE\n" in text and f"UUID:              {name}-uuid" in text

    assert ok(cli_run("table", name)).out.splitlines() == witness.table(name)
    targets = as_json(cli_run("--json", "table", name))
    assert [str(libdm.Target(**t)) for t in targets] == witness.table(name)
    assert ok(cli_run("status", name)).out.splitlines() == witness.status(name)
    targets = as_json(cli_run("status", "--json", name))
    assert [str(libdm.Target(**t)) for t in targets] == witness.status(name)

    assert ok(cli_run("message", name, "0", "@stats_create", "-", "/1")).out == "0\n"
    listed = ok(cli_run("message", name, "0", "@stats_list")).out
    assert listed.splitlines() == witness.dmsetup("message", name, "0", "@stats_list").splitlines()
    assert listed.startswith("0: 0+2056 2056 ")
    ok(cli_run("message", name, "0", "@stats_delete", "0"))
    assert witness.dmsetup("message", name, "0", "@stats_list").strip() == ""

    ok(cli_run("reload", name, "--table", "0 4096 zero"))
    assert dmsetup_state(name) == "LI-w"
    assert witness.dmsetup("table", "--inactive", name).split() == ["0", "4096", "zero"]
    assert as_json(cli_run("table", name, "--inactive", "--json")) == [
        {"start": 0, "length": 4096, "type": "zero", "params": ""}
    ]
    ok(cli_run("suspend", name, "--noflush", "--nolockfs"))
    assert dmsetup_state(name) == "LIsw"
    assert as_json(cli_run("info", name, "--json"))["suspended"] is True
    ok(cli_run("resume", name))
    assert dmsetup_state(name) == "L--w" and witness.table(name) == ["0 4096 zero"]

    ok(cli_run("remove", name))
    assert name not in witness.names()


@kernel
def test_device_command_failures_are_one_line(cli_run, dm_name):
    missing = dm_name("missing")
    for args in (
        ["info", missing],
        ["table", missing],
        ["status", missing],
        ["suspend", missing],
        ["resume", missing],
        ["remove", missing],
        ["message", missing, "0", "hello"],
        ["reload", missing, "--table", "0 8 zero"],
    ):
        failed(cli_run(*args), 1, f"{args[0]} {missing}:", "[ENXIO]")
    name = dm_name("dev")
    ok(cli_run("create", name, "--table", "0 8 zero"))
    failed(cli_run("create", name, "--table", "0 8 zero"), 1, "already exists")
    bad, worse = dm_name("bad"), dm_name("worse")
    failed(
        cli_run("create", bad, "--table", "0 8 no-such-target"),
        1,
        "not available in the kernel",
        "(kernel: table:",
    )
    failed(cli_run("create", worse, "--table", "0 x zero"), 2, "not a whole number")
    assert witness.names() & {bad, worse} == set()


@kernel
def test_create_from_a_file_or_stdin_read_only(dm_name, tmp_path):
    table = tmp_path / "t.table"
    table.write_text("# zeros, then errors\n0 100 zero\n\n100 28 error\n")
    first, second = dm_name("file"), dm_name("stdin")
    ok(run("create", first, "--table-file", table, "--readonly"))
    assert witness.table(first) == ["0 100 zero", "100 28 error"]
    assert dmsetup_state(first) == "L--r"
    assert as_json(run("info", "--json", first))["read_only"] is True
    ok(sh("create", second, "--table-file", "-", stdin=table.read_text()))
    assert witness.table(second) == ["0 100 zero", "100 28 error"]
    ok(run("reload", second, "--table-file", "-", stdin="0 64 zero\n"))
    assert witness.dmsetup("table", "--inactive", second).split() == ["0", "64", "zero"]
    failed(
        run("create", dm_name("nofile"), "--table-file", tmp_path / "absent"),
        1,
        "No such file or directory",
        "[ENOENT]",
    )


@kernel
def test_remove_retries_and_deferred(dm_name):
    name = dm_name("busy")
    ok(run("create", name, "--table", "0 8 zero"))
    fd = os.open(f"/dev/mapper/{name}", os.O_RDONLY)
    try:
        failed(run("remove", name, "--retries", "0"), 1, f"remove {name}:", "[EBUSY]")
        failed(
            run("remove", name, "--retries", "1"),
            1,
            "after 2 attempts",
            "libdm remove --deferred removes it",
        )
        ok(run("remove", name, "--deferred"))
        assert "DEFERRED REMOVE" in witness.dmsetup("info", name)
        assert as_json(run("info", name, "--json"))["deferred_remove"] is True
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while name in witness.names() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert name not in witness.names()


@kernel
def test_ls_and_the_dependency_tree(dm_name):
    base, top = dm_name("base"), dm_name("top")
    ok(run("create", base, "--table", "0 2048 zero"))
    b = witness.info(base)
    ok(run("create", top, "--table", f"0 1024 linear {b['major']}:{b['minor']} 1024"))
    t = witness.info(top)
    listed = {e["name"]: (e["major"], e["minor"]) for e in as_json(run("ls", "--json"))}
    assert set(listed) == witness.names()
    assert listed[base] == (b["major"], b["minor"]) and listed[top] == (t["major"], t["minor"])
    text = ok(run("ls")).out
    assert f"({t['major']}:{t['minor']})" in text.split(top, 1)[1].splitlines()[0]

    forest = as_json(run("ls", "--tree", "--json"))
    roots = {n["name"]: n for n in forest}
    assert top in roots and base not in roots  # base is used by top
    assert [(d["name"], d["major"], d["minor"]) for d in roots[top]["deps"]] == [
        (base, b["major"], b["minor"])
    ]
    assert "1 dependencies" in witness.dmsetup("deps", top)
    assert f"({b['major']}, {b['minor']})" in witness.dmsetup("deps", top)
    drawing = ok(run("ls", "--tree")).out.splitlines()
    at = drawing.index(f"{top} ({t['major']}:{t['minor']})")
    assert drawing[at + 1] == f"└─{base} ({b['major']}:{b['minor']})"


@kernel
def test_version_and_targets_against_dmsetup():
    data = as_json(run("version", "--json"))
    printed = witness.dmsetup("version")
    assert f"Driver version:    {data['driver']}" in printed
    assert f"Library version:   {data['library']}" in printed
    assert data["libdm"] == libdm.__version__
    text = ok(sh("version")).out
    assert f"Driver version:  {data['driver']}" in text
    found = as_json(run("targets", "--json"))
    expected = {
        line.split()[0]: line.split()[1].lstrip("v")
        for line in witness.dmsetup("targets").splitlines()
    }
    assert {t["name"]: t["version"] for t in found} == expected
    lines = ok(run("targets")).out.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(expected)
    assert all(line.split()[1] == "v" + expected[line.split()[0]] for line in lines)


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
        "pass --force",
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
    failed(run("pool", "resize", "1G", "--pool", state), 2, "pool resize:", "block devices")
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
