"""The ``libdm`` command line without a kernel: argument parsing,
``--help`` of every command, exit statuses and one-line errors for bad
usage.

The other files of the command: test_cli_output.py (its JSON and text
formatting), test_cli_devices.py and test_cli_pools.py (every command in
a kernel, run both in-process through ``libdm.cli.main`` and as ``python
-m libdm``, checked against dmsetup, losetup and thin_dump, never against
libdm itself).  Their helpers are in support/cli.py.
"""

import json

import pytest
from support.cli import failed, run, sh

import libdm
from libdm import cli
from libdm.cli import common, device_cmds
from libdm.cli.parser import build_parser

pytestmark = pytest.mark.usefixtures("no_libdm_pool")


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
