"""The test harness itself: kernel runner, pytest plugin, cleanup.

Unit tests need no kernel; ``kernel`` tests prove that the session's test
kernel really has device-mapper; ``host`` tests boot kernels of their own.
"""

import io
import json
import os
import stat
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from libdm.testing import __main__ as cli
from libdm.testing import cleanup, kernel
from libdm.testing.pytest_plugin import _Reports

PLUGIN = "libdm.testing.pytest_plugin"


# -- kernel.py without a kernel ------------------------------------------------


def test_missing_binary_is_unavailable_with_a_hint(tmp_path):
    with pytest.raises(kernel.KernelUnavailable) as caught:
        kernel.find_kernel(str(tmp_path / "linux.uml"))
    assert "no UML kernel at" in caught.value.reason
    assert "user-mode-linux" in caught.value.reason


def _fake_kernel(tmp_path, body="exit 1"):
    """An executable that answers --version like a UML kernel, and does
    ``body`` when booted; plus a modules root with that version."""
    binary = tmp_path / "fake-linux.uml"
    binary.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo 9.9.9; exit 0; }}\n{body}\n')
    binary.chmod(0o755)
    (tmp_path / "modules" / "9.9.9").mkdir(parents=True)
    return str(binary), str(tmp_path / "modules")


def test_missing_modules_dir_is_unavailable(tmp_path):
    binary, _ = _fake_kernel(tmp_path)
    with pytest.raises(kernel.KernelUnavailable, match=r"no modules for UML kernel 9\.9\.9"):
        kernel.find_kernel(binary, str(tmp_path / "elsewhere"))


def test_find_kernel_reports_version_and_modules(tmp_path):
    binary, modules = _fake_kernel(tmp_path)
    info = kernel.find_kernel(binary, modules)
    assert info == kernel.KernelInfo(binary, "9.9.9", os.path.join(modules, "9.9.9"))


def test_kernels_do_not_nest(monkeypatch):
    monkeypatch.setenv(kernel.IN_KERNEL_ENV, "1")
    with pytest.raises(kernel.KernelUnavailable, match="do not nest"):
        kernel.find_kernel()


def test_kernel_that_exits_at_once_did_not_boot(tmp_path):
    binary, modules = _fake_kernel(tmp_path, "echo no boot for you >&2; exit 1")
    with pytest.raises(kernel.KernelUnavailable) as caught:
        kernel.run(["true"], binary=binary, modules_root=modules)
    assert "before running the command" in caught.value.reason
    assert "no boot for you" in caught.value.console  # the console comes back
    assert "no boot for you" in str(caught.value)


def test_timeout_kills_the_kernel_and_cleans_up(tmp_path):
    binary, modules = _fake_kernel(tmp_path, "exec sleep 1000")
    proc = kernel.start(["true"], binary=binary, modules_root=modules, timeout=0.5)
    with pytest.raises(kernel.KernelTimeout):
        proc.wait()
    proc.close()
    assert not os.path.exists(proc.workdir)


def test_command_must_be_a_sequence():
    with pytest.raises(TypeError):
        kernel.start("echo hi")


def test_python_directory_comes_first_on_path():
    env = kernel._command_env({"PATH": "/usr/bin:/bin"})
    bindir = os.path.dirname(sys.executable)
    assert env["PATH"].split(os.pathsep)[0] == bindir
    assert env[kernel.IN_KERNEL_ENV] == "1"
    again = kernel._command_env(env)
    assert again["PATH"] == env["PATH"]  # not added twice


def test_init_script_powers_off_without_teardown():
    script = kernel._init_script(
        "/w", "/m/1.0", ("dm-mod",), ("echo", "a b", "it's"), "/c d", {"X": "1 2"}, False
    )
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)  # it parses
    assert "halt -f -n" in script
    for teardown in ("dmsetup", "losetup", "umount", "sync"):
        assert teardown not in script
    synced = kernel._init_script("/w", "/m/1.0", (), ("true",), "/", {}, True)
    assert "sync; halt -f" in synced


def test_host_has_device_mapper_needs_an_openable_control_node():
    usable = kernel.host_has_device_mapper()
    if usable:
        assert os.geteuid() == 0 and stat.S_ISCHR(os.stat("/dev/mapper/control").st_mode)
    else:
        assert os.geteuid() != 0 or not os.path.exists("/sys/module/dm_mod")


# -- cleanup.py without a kernel -------------------------------------------------


def test_removal_order_puts_holders_first():
    devno = {
        "pool": (253, 0),
        "thin1": (253, 1),
        "thin2": (253, 2),
        "snap": (253, 3),
        "meta": (253, 4),
    }
    deps = {
        "pool": [(253, 4), (7, 0)],  # meta, and a loop outside the set
        "thin1": [(253, 0)],
        "thin2": [(253, 0)],
        "snap": [(253, 1)],
        "meta": [(7, 1)],
    }
    assert cleanup.removal_order(list(devno), devno, deps) == [
        "snap",
        "thin1",
        "thin2",
        "pool",
        "meta",
    ]


def test_removal_order_survives_a_cycle():
    devno = {"a": (1, 1), "b": (1, 2), "c": (1, 3)}
    deps = {"a": [(1, 2)], "b": [(1, 1)]}
    order = cleanup.removal_order(list(devno), devno, deps)
    assert order[0] == "c" and sorted(order) == ["a", "b", "c"]


class FakeDM:
    """libdm's contract, as used by cleanup_devices."""

    class Entry:
        def __init__(self, name, major, minor):
            self.name, self.major, self.minor = name, major, minor

    class Info:
        def __init__(self, suspended):
            self.suspended = suspended

    def __init__(self, devices, deps, suspended=(), stuck=()):
        self.devices = dict(devices)
        self._deps = deps
        self.suspended = set(suspended)
        self.stuck = set(stuck)
        self.calls = []

    def list_devices(self):
        return [self.Entry(n, *d) for n, d in sorted(self.devices.items())]

    def deps(self, name):
        return self._deps.get(name, [])

    def info(self, name):
        return self.Info(name in self.suspended)

    def resume(self, name):
        self.calls.append(("resume", name))
        self.suspended.discard(name)

    def remove(self, name, retries=0):
        self.calls.append(("remove", name))
        if name in self.stuck:
            raise OSError(16, "Device or resource busy")
        if name in self.suspended:
            raise AssertionError(f"{name} removed while suspended")
        del self.devices[name]


def test_cleanup_devices_resumes_then_removes_in_order():
    dm = FakeDM(
        {"t-pool": (253, 0), "t-thin": (253, 1), "other": (253, 2)},
        {"t-thin": [(253, 0)]},
        suspended={"t-pool", "t-thin"},
    )
    assert cleanup.cleanup_devices("t-", dm=dm) == ["t-thin", "t-pool"]
    assert dm.calls == [
        ("resume", "t-pool"),
        ("resume", "t-thin"),
        ("remove", "t-thin"),
        ("remove", "t-pool"),
    ]
    assert list(dm.devices) == ["other"]


def test_cleanup_devices_reports_what_stayed():
    dm = FakeDM({"t-a": (253, 0), "t-b": (253, 1)}, {}, stuck={"t-a"})
    with pytest.raises(cleanup.CleanupError) as caught:
        cleanup.cleanup_devices("t-", dm=dm)
    assert caught.value.failures == ["device t-a: [Errno 16] Device or resource busy"]
    assert list(dm.devices) == ["t-a"]  # the others were still removed


def test_cleanup_devices_refuses_an_empty_prefix():
    with pytest.raises(ValueError):
        cleanup.cleanup_devices("", dm=FakeDM({}, {}))


def test_detach_loops_ignores_other_directories(tmp_path):
    assert cleanup.detach_loops(tmp_path) == []


# -- plugin pieces without a kernel ---------------------------------------------


def test_dm_name_gives_unique_names_under_the_prefix(dm_prefix, dm_name):
    assert dm_prefix.startswith("libdmtest-") and dm_prefix.endswith("-")
    assert dm_name("pool") == dm_prefix + "pool"
    assert dm_name("pool") == dm_prefix + "pool-2"
    assert dm_name() == dm_prefix + "dev"
    with pytest.raises(ValueError):
        dm_name("a/b")
    with pytest.raises(ValueError):
        dm_name("x" * 130)


def test_reports_reader_waits_for_whole_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    reader = _Reports(str(path))
    assert reader.read() == []
    path.write_bytes(b'{"a": 1}\n{"b"')
    assert reader.read() == [{"a": 1}]
    with open(path, "ab") as f:
        f.write(b": 2}\n")
    assert reader.read() == [{"b": 2}]


KERNEL_TEST = """
import pytest

@pytest.mark.kernel
def test_needs_dm():
    pass

def test_plain():
    pass
"""


def test_no_kernel_skips_with_a_hint(pytester, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(KERNEL_TEST)
    missing = pytester.path / "no-linux.uml"
    result = pytester.runpytest_subprocess(
        "-p", PLUGIN, "--dm-kernel=uml", f"--dm-kernel-binary={missing}", "-rs"
    )
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*no UML kernel at*user-mode-linux*"])


def test_no_kernel_fails_on_ci(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(KERNEL_TEST)
    missing = pytester.path / "no-linux.uml"
    result = pytester.runpytest_subprocess(
        "-p", PLUGIN, "--dm-kernel=uml", f"--dm-kernel-binary={missing}"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*CI=true*no UML kernel at*"])
    assert result.ret == 1


def test_a_kernel_that_never_boots_fails_the_kernel_tests(pytester, monkeypatch, tmp_path):
    monkeypatch.delenv("CI", raising=False)
    binary, modules = _fake_kernel(tmp_path, "echo panic at the disco >&2; exit 1")
    monkeypatch.setenv("LIBDM_UML_MODULES", modules)
    pytester.makepyfile(KERNEL_TEST)
    result = pytester.runpytest_subprocess(
        "-p", PLUGIN, "--dm-kernel=uml", f"--dm-kernel-binary={binary}"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*before running the command*", "*panic at the disco*"])


def test_kernel_and_host_markers_exclude_each_other(pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.kernel
        @pytest.mark.host
        def test_both():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", PLUGIN)
    result.stderr.fnmatch_lines(["*cannot be marked both kernel and host*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_cli_without_a_kernel_says_why(monkeypatch, capsys):
    monkeypatch.setenv("LIBDM_UML_BINARY", "/nonexistent/linux.uml")
    if not kernel.host_has_device_mapper():
        assert cli.main(["run", "--", "true"]) == cli.NO_KERNEL
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no UML kernel at /nonexistent/linux.uml" in err
    cli.main(["check"])
    assert (
        "UML kernel: unavailable: no UML kernel at /nonexistent/linux.uml"
        in capsys.readouterr().out
    )


# -- inside the session's test kernel --------------------------------------------


def _run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.mark.kernel
def test_device_mapper_is_there():
    assert stat.S_ISCHR(os.stat("/dev/mapper/control").st_mode)
    assert "Driver version:" in _run("dmsetup", "version")
    targets = {line.split()[0] for line in _run("dmsetup", "targets").splitlines()}
    assert {"thin-pool", "thin", "flakey", "zero", "snapshot", "linear"} <= targets
    assert os.path.exists("/dev/loop-control")


@pytest.mark.kernel
def test_cleanup_removes_a_stack_including_a_suspended_device(dm_prefix):
    import libdm
    from libdm import Target

    base = libdm.create(dm_prefix + "base", [Target(0, 1000, "zero")])
    libdm.create(dm_prefix + "top", [Target(0, 1000, "linear", f"{base.major}:{base.minor} 0")])
    libdm.create(dm_prefix + "alone", [Target(0, 8, "zero")])
    libdm.suspend(dm_prefix + "top")
    removed = cleanup.cleanup_devices(dm_prefix)
    assert removed == [dm_prefix + "alone", dm_prefix + "top", dm_prefix + "base"]
    assert dm_prefix not in _run("dmsetup", "ls")  # the independent witness agrees


FIXTURE_CLEANUP_TEST = """
import os, subprocess
import pytest
import libdm
from libdm import Target

@pytest.mark.kernel
def test_leaves_a_mess(dm_name, tmp_path):
    with open("names.txt", "w") as f:
        base = libdm.create(dm_name("base"), [Target(0, 1000, "zero")])
        top = dm_name("top")
        libdm.create(top, [Target(0, 1000, "linear", f"{base.major}:{base.minor} 0")])
        libdm.suspend(top)
        f.write(top.rsplit("-", 1)[0] + "\\n")
        image = tmp_path / "disk.img"
        image.write_bytes(b"")
        os.truncate(image, 1 << 20)
        loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                              capture_output=True, text=True).stdout.strip()
        f.write(str(tmp_path) + "\\n")
        (tmp_path / "mnt").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "none", str(tmp_path / "mnt")], check=True)
    assert False, "fails on purpose, leaving devices, a loop and a mount"
"""


@pytest.mark.kernel
def test_fixtures_clean_up_after_a_failed_test(pytester):
    import libdm

    pytester.makepyfile(FIXTURE_CLEANUP_TEST)
    result = pytester.runpytest_inprocess("-p", PLUGIN, "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)  # failed, and no teardown error
    prefix, tmp = (pytester.path / "names.txt").read_text().split()
    assert not [d for d in libdm.list_devices() if d.name.startswith(prefix)]
    assert tmp not in _run("cat", "/proc/self/mountinfo")
    assert tmp not in _run("losetup", "-a")


# -- kernels booted here ----------------------------------------------------


@pytest.mark.host
def test_run_returns_status_and_both_streams(run_in_kernel):
    out, err = io.StringIO(), io.StringIO()
    result = run_in_kernel(["sh", "-c", "echo out; echo err >&2; exit 7"], stream=(out, err))
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert (out.getvalue(), err.getvalue()) == ("out\n", "err\n")  # streamed too
    assert "Run " in result.console and "as init process" in result.console
    with pytest.raises(subprocess.CalledProcessError):
        result.check_returncode()


@pytest.mark.host
def test_command_runs_here_with_our_python_and_leaves_its_files(uml_kernel, tmp_path):
    lib_modules = os.path.exists("/lib/modules")
    args = ["a b", "it's", "$HOME", "x\ny", ""]
    script = (
        "import json, os, sys, libdm;"
        "open('made-inside.txt', 'w').write(os.environ['GREETING']);"
        "print(json.dumps([sys.executable, os.getcwd(), os.geteuid(),"
        " os.environ['PATH'], sys.argv[1:]]))"
    )
    with kernel.start(
        [sys.executable, "-c", script, *args],
        cwd=tmp_path,
        env={"GREETING": "hello from inside", "PATH": "/usr/bin:/bin"},
        binary=uml_kernel.binary,
        modules=(),
    ) as running:
        result = running.wait()
    assert result.returncode == 0, result.stderr
    executable, cwd, euid, path, argv = json.loads(result.stdout)
    assert (executable, cwd, euid, argv) == (sys.executable, str(tmp_path), 0, args)
    assert path.split(":")[0] == os.path.dirname(sys.executable)
    assert (tmp_path / "made-inside.txt").read_text() == "hello from inside"
    assert not os.path.exists(running.workdir)  # nothing else stays on the host
    assert os.path.exists("/lib/modules") == lib_modules


@pytest.mark.host
def test_a_module_that_does_not_load(run_in_kernel):
    with pytest.raises(kernel.KernelUnavailable, match="no-such-module"):
        run_in_kernel(["true"], modules=("dm-mod", "no-such-module"))


@pytest.mark.host
def test_a_command_that_halts_the_kernel_is_a_crash(run_in_kernel):
    # halt -f mid-command: a power cut from inside.
    with pytest.raises(kernel.KernelCrashed) as caught:
        run_in_kernel(["sh", "-c", "echo before; halt -f -n; sleep 100"], modules=())
    assert caught.value.result.stdout == "before\n"


@pytest.mark.host
def test_cli_passes_the_exit_status_through(uml_kernel):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "libdm.testing",
            "run",
            "--uml",
            "--",
            "sh",
            "-c",
            "echo streamed; exit 5",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "LIBDM_UML_BINARY": uml_kernel.binary},
    )
    assert (proc.returncode, proc.stdout) == (5, "streamed\n")


REPLAY_TESTS = {
    "pkgcov.py": """
        def only_inside():
            return 42
    """,
    "conftest.py": """
        import os
        import pytest

        @pytest.fixture(scope="module")
        def where(request):
            # Records where the fixture ran: never on the host for kernel tests.
            with open(os.path.join(str(request.config.rootpath), "fixture-log"), "a") as f:
                f.write(os.environ.get("LIBDM_TESTING_IN_KERNEL", "host") + "\\n")
            return "x"
    """,
    "test_a.py": """
        import os
        import pytest
        import pkgcov

        def test_local_first(where):
            pass

        @pytest.mark.kernel
        def test_inside(where):
            assert os.environ["LIBDM_TESTING_IN_KERNEL"] == "1"
            assert pkgcov.only_inside() == 42
            print("captured inside")

        @pytest.mark.kernel
        def test_fails_inside(where):
            value = "in the kernel"
            assert value == "somewhere else"

        @pytest.mark.kernel
        def test_skips_inside():
            pytest.skip("skipped inside")
    """,
    "test_b.py": """
        import pytest

        def test_local_after(where):
            pass
    """,
}


@pytest.mark.host
def test_kernel_tests_are_replayed_as_ordinary_tests(pytester, uml_kernel, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    for name, text in REPLAY_TESTS.items():
        pytester.path.joinpath(name).write_text(textwrap.dedent(text))
    result = pytester.runpytest_subprocess(
        "-p", PLUGIN, "--dm-kernel=uml", f"--dm-kernel-binary={uml_kernel.binary}",
        "--cov=pkgcov", "--cov-report=term-missing", "--junitxml=junit.xml", "-rA", "-v",
    )  # fmt: skip
    result.assert_outcomes(passed=3, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "test_a.py::test_local_first PASSED*",
            "test_a.py::test_inside PASSED*",
            "test_a.py::test_fails_inside FAILED*",
            "test_a.py::test_skips_inside SKIPPED*",
            "test_b.py::test_local_after PASSED*",
            "*AssertionError: assert 'in the kernel' == 'somewhere else'*",
            "*captured inside*",
            # A line run only inside the kernel counts as covered.
            "pkgcov.py * 100%*",
            "SKIPPED*test_a.py:*skipped inside",
        ]
    )
    log = (pytester.path / "fixture-log").read_text().split()
    assert sorted(log) == [
        "1",
        "host",
        "host",
    ]  # module fixture: a, b on the host; a in the kernel
    cases = ET.parse(pytester.path / "junit.xml").getroot().iter("testcase")
    assert sorted(c.get("name") for c in cases) == [
        "test_fails_inside",
        "test_inside",
        "test_local_after",
        "test_local_first",
        "test_skips_inside",
    ]


@pytest.mark.host
def test_a_kernel_that_dies_fails_the_tests_it_did_not_report(pytester, uml_kernel):
    pytester.makepyfile(
        """
        import os, time
        import pytest

        @pytest.mark.kernel
        def test_before():
            pass

        @pytest.mark.kernel
        def test_halts():
            os.system("halt -f -n")
            time.sleep(100)

        def test_local():
            pass

        @pytest.mark.kernel
        def test_after():
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", PLUGIN, "--dm-kernel=uml", f"--dm-kernel-binary={uml_kernel.binary}"
    )
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*test kernel stopped before the command finished*"])


@pytest.mark.host
def test_kernels_side_by_side_share_the_modules(pytester, uml_kernel):
    """Two kernels: each module runs whole in one of them, every test once,
    and a module's fixture is set up once, in the kernel that runs it."""
    # Each setup and run leaves a file of its own: two kernels appending to
    # one shared host file can overwrite each other's lines.
    module = """
        import os, time
        import pytest

        def leave(kind, boot, request):
            directory = os.path.join(str(request.config.rootpath), kind)
            name = f"{request.node.nodeid.replace('/', '_')} {os.getpid()} {time.monotonic_ns()}"
            with open(os.path.join(directory, name), "w") as fh:
                fh.write(f"{request.node.nodeid} {boot}\\n")

        @pytest.fixture(scope="module")
        def boot(request):
            with open("/proc/sys/kernel/random/boot_id") as fh:
                boot = fh.read().strip()
            leave("setups", boot, request)
            return boot

        @pytest.mark.kernel
        @pytest.mark.parametrize("n", range(3))
        def test_runs_once(boot, request, n):
            time.sleep(1)
            leave("runs", boot, request)
    """
    for name in ("test_m1.py", "test_m2.py", "test_m3.py", "test_m4.py"):
        pytester.path.joinpath(name).write_text(textwrap.dedent(module))
    for kind in ("setups", "runs"):
        pytester.path.joinpath(kind).mkdir()
    result = pytester.runpytest_subprocess(
        "-p", PLUGIN, "--dm-kernel=uml", f"--dm-kernel-binary={uml_kernel.binary}",
        "--dm-kernels=2",
    )  # fmt: skip
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(["*(kernel 1 of 2)*", "*(kernel 2 of 2)*"])

    def left(kind):
        return [f.read_text().split() for f in sorted((pytester.path / kind).iterdir())]

    runs = left("runs")
    assert sorted(nodeid for nodeid, _ in runs) == sorted(
        f"test_m{m}.py::test_runs_once[{n}]" for m in range(1, 5) for n in range(3)
    )
    setups = left("setups")
    assert sorted(nodeid for nodeid, _ in setups) == [  # once each
        "test_m1.py", "test_m2.py", "test_m3.py", "test_m4.py"
    ]  # fmt: skip
    setups = {nodeid.split(".py")[0]: boot for nodeid, boot in setups}
    for nodeid, boot in runs:
        assert setups[nodeid.split(".py")[0]] == boot  # in the kernel that set it up
    assert len(set(setups.values())) == 2  # both kernels took modules


def test_kernels_must_be_a_count(pytester):
    result = pytester.runpytest_subprocess("-p", PLUGIN, "--dm-kernels=none")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--dm-kernels must be auto or a number*"])
