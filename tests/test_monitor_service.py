"""The monitor service (``libdm monitor serve``): one process watching every
registered pool, picking up pools registered or removed while it runs, as
dmeventd does for LVM.

The service runs as its own process, as under systemd; the test waits on
what it writes (its status file, the pool's table), with deadlines, never
on sleeps.  Witnesses: dmsetup table/status of the pools.
"""

import json
import os
import subprocess

import pytest
from support import witness
from support.blockio import MiB, write_pattern
from support.cli import monitor_status, run_cli, start_monitor, stop_monitor
from support.poll import until

import libdm

pytestmark = pytest.mark.kernel


@pytest.fixture
def service_env(tmp_path, monkeypatch):
    env = dict(
        os.environ,
        LIBDM_MONITOR_DIR=str(tmp_path / "monitor.d"),
        LIBDM_RUN_DIR=str(tmp_path / "run"),
        JOURNAL_STREAM="8:1234",
    )
    env.pop("LIBDM_POOL", None)
    for key in ("LIBDM_MONITOR_DIR", "LIBDM_RUN_DIR"):
        monkeypatch.setenv(key, env[key])
    return env


def status(env):
    return monitor_status(env["LIBDM_RUN_DIR"])


def data_sectors(name):
    return int(witness.table(name)[0].split()[1])


def test_the_service_watches_every_registered_pool(dm_name, tmp_path, service_env):
    name_a = dm_name("a")
    a = libdm.Pool.create_loop(name_a, tmp_path / "a", data_size="64M", min_free_space=0)
    b = libdm.Pool.create_loop(dm_name("b"), tmp_path / "b", data_size="64M")
    a.close(), b.close()
    assert (
        run_cli(
            "monitor", "register", "--pool", tmp_path / "a", "--threshold", 50, env=service_env
        ).returncode
        == 0
    )
    service = start_monitor(service_env, "--rescan", 0.2, "--interval", 0.5)
    try:
        until(
            lambda: status(service_env).get(str(tmp_path / "a"), {}).get("running"),
            "the service to watch pool a",
        )
        with libdm.Pool.load(tmp_path / "a") as pool:
            assert (
                pool.info().as_dict()["Monitored"]
                == "yes, by libdm monitor (grow by 20% at 50% used)"
            )
            dev = pool.create_thin("vol", "128M")
            write_pattern(dev.path, 0x77, length=40 * MiB)  # 62% of 64 MiB
        until(lambda: data_sectors(name_a) > 64 * MiB // 512, "pool a to grow")
        assert witness.pool_status(name_a)[4] == "rw"

        # A pool registered while the service runs is picked up...
        assert (
            run_cli("monitor", "register", "--pool", tmp_path / "b", env=service_env).returncode
            == 0
        )
        until(
            lambda: status(service_env).get(str(tmp_path / "b"), {}).get("running"),
            "the service to watch pool b",
        )
        # ...and one removed is dropped.
        assert (
            run_cli("monitor", "unregister", "--pool", tmp_path / "a", env=service_env).returncode
            == 0
        )
        until(lambda: str(tmp_path / "a") not in status(service_env), "pool a to be dropped")
        with libdm.Pool.load(tmp_path / "a") as pool:
            assert pool.info().as_dict()["Monitored"] == "no"
        listing = run_cli("monitor", "ls", "--json", env=service_env)
        assert [(r["pool"], r["watched"]) for r in json.loads(listing.stdout)] == [
            (str(tmp_path / "b"), True)
        ]
    finally:
        err = stop_monitor(service)
    assert service.returncode == 0, err
    lines = err.splitlines()
    # Journal-ready: every line carries its syslog priority.
    odd = [line for line in lines if not (line[:1] == "<" and line[2:3] == ">")]
    assert lines and not odd, odd
    assert any(line.startswith("<6>pool ") and "grown from 64 MiB" in line for line in lines)
    assert lines[-1] == "<6>libdm monitor: stopped"
    assert not os.path.exists(os.path.join(service_env["LIBDM_RUN_DIR"], "monitor.json"))
    with libdm.Pool.load(tmp_path / "b") as pool:
        assert pool.info().as_dict()["Monitored"].startswith("registered (")


def test_a_pool_not_active_yet_is_watched_once_it_is(dm_name, tmp_path, service_env):
    pool = libdm.Pool.create_loop(dm_name("p"), tmp_path / "p", data_size="64M")
    pool.destroy()  # down, as before "libdm pool open" after a reboot
    assert (
        run_cli("monitor", "register", "--pool", tmp_path / "p", env=service_env).returncode == 0
    )
    service = start_monitor(service_env, "--rescan", 0.2)
    try:
        until(lambda: str(tmp_path / "p") in status(service_env), "a first scan")
        assert not status(service_env)[str(tmp_path / "p")]["running"]
        libdm.Pool.open(tmp_path / "p").close()
        until(
            lambda: status(service_env)[str(tmp_path / "p")]["running"],
            "the service to watch the pool once active",
        )
    finally:
        err = stop_monitor(service)
    assert service.returncode == 0, err
    assert "is not active" in err


def test_the_status_file_is_written_through_no_symlink_and_removed_only_if_its_own(
    tmp_path, service_env
):
    from libdm.service import MonitorService

    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("someone else's data\n")
    (run / "monitor.json.tmp").symlink_to(victim)
    status_path = run / "monitor.json"
    service = MonitorService(service_env["LIBDM_MONITOR_DIR"], str(status_path), rescan=60)
    service.scan()
    service.scan()
    assert victim.read_text() == "someone else's data\n"
    assert os.readlink(run / "monitor.json.tmp") == str(victim)
    assert not status_path.is_symlink()
    assert json.loads(status_path.read_text())["pid"] == os.getpid()
    # Once the service has stopped, its own status file is gone...
    service.stop()
    service.run()
    assert not os.path.lexists(status_path)
    assert sorted(os.listdir(run)) == ["monitor.json.tmp"]

    # ...but not a file put in its place meanwhile.
    service = MonitorService(service_env["LIBDM_MONITOR_DIR"], str(status_path), rescan=60)
    service.scan()
    status_path.unlink()
    status_path.write_text("someone else's status\n")
    service.stop()
    service.run()
    assert status_path.read_text() == "someone else's status\n"

    # A symlink planted as the status file is neither replaced nor removed.
    status_path.unlink()
    status_path.symlink_to(victim)
    service = MonitorService(service_env["LIBDM_MONITOR_DIR"], str(status_path), rescan=60)
    service.scan()
    service.stop()
    service.run()
    assert os.readlink(status_path) == str(victim)
    assert victim.read_text() == "someone else's data\n"

    # The status file of a service that died is replaced (a restart).
    status_path.unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    status_path.write_text(json.dumps({"pid": dead.pid, "pools": {}}))
    service = MonitorService(service_env["LIBDM_MONITOR_DIR"], str(status_path), rescan=60)
    service.scan()
    assert json.loads(status_path.read_text())["pid"] == os.getpid()
    service.stop()
    service.run()
    assert not os.path.lexists(status_path)


def test_a_malformed_registration_is_reported_and_skipped(dm_name, tmp_path, service_env):
    pool = libdm.Pool.create_loop(dm_name("p"), tmp_path / "p", data_size="64M")
    pool.close()
    assert (
        run_cli("monitor", "register", "--pool", tmp_path / "p", env=service_env).returncode == 0
    )
    bad = os.path.join(service_env["LIBDM_MONITOR_DIR"], "other.toml")
    with open(bad, "w") as fh:  # a hand-edited file with a typo
        fh.write('pool = "/var/lib/other"\nthreshold = 80\nspares = ["/dev/sdx"\n')
    service = start_monitor(service_env, "--rescan", 0.2)
    try:
        until(
            lambda: status(service_env).get(str(tmp_path / "p"), {}).get("running"),
            "the service to watch the pool",
        )
        listing = run_cli("monitor", "ls", "--json", env=service_env)
        assert listing.returncode == 0, listing.stderr
        rows = {r["file"]: r for r in json.loads(listing.stdout)}
        assert rows[bad]["pool"] is None and not rows[bad]["watched"]
        assert "not valid" in rows[bad]["invalid"]
        assert [r["pool"] for r in rows.values() if r["invalid"] is None] == [str(tmp_path / "p")]
        text = run_cli("monitor", "ls", env=service_env)
        assert text.returncode == 0 and bad in text.stdout and "invalid" in text.stdout
        gone = run_cli("monitor", "unregister", "--pool", tmp_path / "p", env=service_env)
        assert gone.returncode == 0, gone.stderr
        until(lambda: str(tmp_path / "p") not in status(service_env), "the pool to be dropped")
    finally:
        err = stop_monitor(service)
    assert service.returncode == 0, err
    reports = [line for line in err.splitlines() if bad in line]
    assert len(reports) == 1 and reports[0].startswith("<3>"), err
    assert "skipped" in reports[0]
    assert os.path.exists(bad)


def test_register_leaves_a_file_it_cannot_read_under_its_name(tmp_path, service_env):
    """A file already at the registration's name that is not a
    registration libdm can read (another tool's, a hand edit with a typo)
    is refused and left as it is.  Found by an outside review."""
    (tmp_path / "p").mkdir()
    first = run_cli("monitor", "register", "--pool", tmp_path / "p", env=service_env)
    assert first.returncode == 0, first.stderr
    (path,) = (
        os.path.join(service_env["LIBDM_MONITOR_DIR"], name)
        for name in os.listdir(service_env["LIBDM_MONITOR_DIR"])
    )
    theirs = b'# my own settings\nthreshold = "eighty"\n'
    with open(path, "wb") as fh:
        fh.write(theirs)
    again = run_cli("monitor", "register", "--pool", tmp_path / "p", env=service_env)
    assert again.returncode == 1, again.stderr
    assert path in again.stderr and "left alone" in again.stderr, again.stderr
    with open(path, "rb") as fh:
        assert fh.read() == theirs


def test_pools_whose_paths_differ_by_slash_or_dash_have_their_own_registration(
    tmp_path, service_env
):
    conf = tmp_path / "monitor.d"
    conf.mkdir()
    # Registering touches no pool: paths with no '-' of their own, so that
    # b's and c's files in the earlier format (every '/' replaced by '-')
    # are named as a's and d's would be by that format.
    a, b = "/libdmtest/var/lib/images", "/libdmtest/var/lib-images"
    c = "/libdmtest/srv-data"
    for pool, threshold in ((b, 70), (c, 75)):
        old = conf / (pool.strip("/").replace("/", "-") + ".toml")
        old.write_text(f'pool = "{pool}"\nthreshold = {threshold}\npercent = 10\n')

    def listed():
        out = run_cli("monitor", "ls", "--json", env=service_env)
        assert out.returncode == 0, out.stderr
        return sorted((r["pool"], r["threshold"]) for r in json.loads(out.stdout))

    assert listed() == sorted([(b, 70), (c, 75)])
    made = run_cli("monitor", "register", "--pool", a, env=service_env)
    assert made.returncode == 0, made.stderr
    assert listed() == sorted([(a, 80), (b, 70), (c, 75)])
    # Registering b or c again replaces its file rather than adding a second.
    for pool in (b, c):
        again = run_cli("monitor", "register", "--pool", pool, "--threshold", 60, env=service_env)
        assert again.returncode == 0, again.stderr
    assert listed() == sorted([(a, 80), (b, 60), (c, 60)])
    assert len(os.listdir(conf)) == 3
    for pool in (a, b, c):
        gone = run_cli("monitor", "unregister", "--pool", pool, env=service_env)
        assert gone.returncode == 0, gone.stderr
        assert pool not in dict(listed())
    assert os.listdir(conf) == []
