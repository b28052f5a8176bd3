"""The ``libdm`` device commands in a kernel (create, table, status,
remove, ls, ...), as dmsetup's: each run in-process and as ``python -m
libdm``, checked against dmsetup, with its JSON parsed back, and one
failure per command."""

import os

import pytest
from support import witness
from support.cli import as_json, failed, ok, run, sh
from support.poll import until

import libdm

kernel = pytest.mark.kernel
pytestmark = pytest.mark.usefixtures("no_libdm_pool")

MiB = 1 << 20


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
            "--deferred removes it when its last user closes it",
        )
        ok(run("remove", name, "--deferred"))
        assert "DEFERRED REMOVE" in witness.dmsetup("info", name)
        assert as_json(run("info", name, "--json"))["deferred_remove"] is True
    finally:
        os.close(fd)
    until(lambda: name not in witness.names(), f"{name} to be removed", 10)


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
