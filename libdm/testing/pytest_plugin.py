"""pytest plugin: run ``kernel``-marked tests where device-mapper exists.

Load it from a conftest with ``pytest_plugins = ["libdm.testing.pytest_plugin"]``.

Markers:
    ``kernel``: the test needs a real device-mapper, as root.
    ``host``: the test boots test kernels itself, so it runs on the host
    (never inside a test kernel).

``--dm-kernel=auto|host|uml`` picks where ``kernel`` tests run: ``host``
runs them in this process (root and /dev/mapper/control needed), ``uml``
inside a User-Mode Linux kernel, ``auto`` (the default, or
``$LIBDM_DM_KERNEL``) the host when it can, else UML.

In UML mode test kernels boot early in the session (``--dm-kernels``,
by default one per CPU, at most four) and each runs an inner pytest on the
node ids of every selected kernel test while the other tests run here.
With more than one kernel, each test module runs whole in the kernel that
claims it first (a file created exclusively in a directory they share), so
a kernel that finishes early takes the next module.  The inner session
writes each test report as a JSON line to a host file; this session
replays them in item order in place of running those items (their
fixtures never run here), so counts, tracebacks, ``-ra`` and junit see
ordinary tests.  A test its kernel never reported (it died, timed out,
or never booted) fails with the reason and the console's tail.

Without a kernel a ``kernel`` test is skipped, saying how to get one; with
``CI=true`` in the environment it fails instead.  Under pytest-cov the
inner session runs under coverage too, writing a parallel data file next
to this session's, which pytest-cov combines into its report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, Literal, NoReturn

import pytest

from libdm.testing import cleanup as _cleanup
from libdm.testing import kernel as _kernel
from libdm.testing.ci import in_ci

#: Set for the inner session: the host file its reports go to.
REPORTS_ENV = "LIBDM_TESTING_REPORTS"
#: Set for an inner session among several: the directory of module claims,
#: and the number of its kernel.
CLAIMS_ENV = "LIBDM_TESTING_CLAIMS"
KERNEL_NUMBER_ENV = "LIBDM_TESTING_KERNEL_NUMBER"
_MAX_KERNELS = 4

_HOW_TO_GET = (
    "or run as root on a kernel with device-mapper; python -m libdm.testing check tells more"
)
_DM_NAME_MAX = 127  # DM_NAME_LEN - 1

_session_token = secrets.token_hex(3)
_test_counter = itertools.count(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("libdm", "libdm device-mapper test kernel")
    group.addoption(
        "--dm-kernel",
        default=os.environ.get("LIBDM_DM_KERNEL", "auto"),
        help="where kernel-marked tests run: auto (default), host, or uml",
    )
    group.addoption(
        "--dm-kernel-binary",
        default=None,
        metavar="PATH",
        help=f"UML kernel executable (default $LIBDM_UML_BINARY or {_kernel.DEFAULT_BINARY})",
    )
    group.addoption(
        "--dm-kernel-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="kill the session's test kernel after this long (default 1800)",
    )
    group.addoption(
        "--dm-kernel-mem", default="1G", metavar="SIZE", help="memory of test kernels (default 1G)"
    )
    group.addoption(
        "--dm-kernels",
        default=os.environ.get("LIBDM_DM_KERNELS", "auto"),
        metavar="N",
        help=f"test kernels run side by side in UML mode: auto (default, or "
        f"$LIBDM_DM_KERNELS) is one per CPU, at most {_MAX_KERNELS}",
    )


BOOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "boot")


def arm_child_processes() -> None:
    """Put the crash-point bootstrap (``boot/sitecustomize.py``) first on
    ``PYTHONPATH``, so that a child process a test starts with
    ``LIBDM_CRASH_AT`` in its environment is armed (see libdm.thin.crash)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if BOOT_DIR not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([BOOT_DIR, *paths])


def pytest_configure(config: pytest.Config) -> None:
    arm_child_processes()
    # The markers are declared here, once, for every suite that loads the plugin.
    config.addinivalue_line(
        "markers",
        "kernel: needs a real kernel device-mapper, as root"
        " (runs inside the test kernel when the host has none)",
    )
    config.addinivalue_line(
        "markers",
        "host: boots test kernels itself, so it runs on the host, never inside a test kernel",
    )
    if config.option.dm_kernel not in ("auto", "host", "uml"):
        raise pytest.UsageError(
            f"--dm-kernel must be auto, host or uml, not {config.option.dm_kernel!r}"
        )
    _kernel_count(config)  # a bad value is a usage error at once
    config.pluginmanager.register(_Harness(config), "libdm-harness")


def _kernel_count(config: pytest.Config) -> int:
    """How many test kernels a UML session boots (``--dm-kernels``)."""
    value = str(config.option.dm_kernels)
    if value == "auto":
        return max(1, min(os.cpu_count() or 1, _MAX_KERNELS))
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise pytest.UsageError(f"--dm-kernels must be auto or a number from 1, not {value!r}")
    return count


def _module_of(nodeid: str) -> str:
    """The module part of a node id: the unit kernels claim."""
    return nodeid.split("::", 1)[0]


class _Claims:
    """Which kernel runs which test module, when several share the work: a
    kernel claims a module by creating its file exclusively (atomic on the
    host filesystem they share), writing its number into it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, module: str) -> str:
        return os.path.join(self.directory, hashlib.sha1(module.encode()).hexdigest())

    def claim(self, module: str, number: int) -> bool:
        """Claim ``module`` for kernel ``number``; False if another has it."""
        try:
            fd = os.open(self._path(module), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return self.owner(module) == number
        try:
            os.write(fd, str(number).encode())
        finally:
            os.close(fd)
        return True

    def owner(self, module: str) -> int | None:
        """The kernel that claimed ``module``, or None (not yet, or its
        number is still being written)."""
        try:
            with open(self._path(module)) as fh:
                text = fh.read()
        except FileNotFoundError:
            return None
        return int(text) if text else None


def _harness(config: pytest.Config) -> _Harness:
    harness = config.pluginmanager.get_plugin("libdm-harness")
    assert isinstance(harness, _Harness)
    return harness


def _interpreter_flags() -> list[str]:
    """The flags this Python runs with that decide what it imports, for a
    Python started the same way (``-P``: no working directory or script
    directory on ``sys.path``, so a source tree there cannot shadow the
    installed package)."""
    if sys.flags.isolated:
        return ["-I"]
    flags = []
    if sys.flags.safe_path:
        flags.append("-P")
    if sys.flags.ignore_environment:
        flags.append("-E")
    if sys.flags.no_user_site:
        flags.append("-s")
    return flags


@dataclasses.dataclass(frozen=True)
class _Where:
    """Where kernel tests run: on this host, in a UML kernel, or nowhere."""

    kind: Literal["host", "uml"] | None  # None: no kernel can be had
    kernel: _kernel.KernelInfo | None = None  # the UML kernel
    reason: str = ""  # why no kernel can be had


@dataclasses.dataclass(frozen=True)
class _Coverage:
    """pytest-cov's settings in this session, for the inner session."""

    data_file: str
    rcfile: str | None
    source: list[str] | None
    branch: bool


class _Reports:
    """Reads the JSON lines the inner session appends to a host file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # an incomplete last line waits for more
        return [json.loads(line) for line in lines if line.strip()]


class _KernelSession:
    """A test kernel of the session and the reports it sends back: kernel
    ``number`` of ``count``, sharing the modules through ``claims`` when
    there are several."""

    def __init__(
        self,
        config: pytest.Config,
        items: list[pytest.Item],
        info: _kernel.KernelInfo,
        number: int = 0,
        count: int = 1,
        claims: _Claims | None = None,
    ) -> None:
        self.config = config
        self.info = info
        self.number, self.count, self.claims = number, count, claims
        self.nodeids = [item.nodeid for item in items]
        # nodeid -> reports received, not yet replayed
        self.pending: dict[str, list[pytest.TestReport]] = {}
        self.ran: set[str] = set()  # modules it sent reports of
        self.kernel: _kernel.KernelProcess | None = None
        self.failure: str | None = None  # why unreported tests fail, once known
        self.exit_status: int | None = None
        self.result: _kernel.KernelResult | None = None
        self.workdir: str | None = None
        self.coverage: _Coverage | None = None
        self.reports = _Reports(os.devnull)
        try:
            self.workdir = _kernel._private_dir()
            self.reports = _Reports(os.path.join(self.workdir, "reports.jsonl"))
            self.kernel = _kernel.start(
                self._command(self.workdir),
                # The outer session's working directory: a child process a
                # test starts sees the same one in both sessions.
                cwd=str(config.invocation_params.dir),
                env=self._env(),
                mem=config.option.dm_kernel_mem,
                timeout=config.option.dm_kernel_timeout,
                stream=config.option.capture == "no",
                binary=info.binary,
            )
        except (_kernel.KernelError, OSError) as exc:
            self.failure = f"no test kernel: {exc}"

    def _coverage(self) -> _Coverage | None:
        """Coverage settings of pytest-cov in this session, or None."""
        plugin = self.config.pluginmanager.get_plugin("_cov")
        controller = getattr(plugin, "cov_controller", None)
        cov = getattr(controller, "cov", None)
        if cov is None:
            return None
        topdir = getattr(controller, "topdir", None) or os.getcwd()
        return _Coverage(
            data_file=os.path.join(topdir, cov.get_option("run:data_file")),
            rcfile=getattr(cov.config, "config_file", None),
            source=cov.get_option("run:source"),
            branch=bool(cov.get_option("run:branch")),
        )

    def _command(self, workdir: str) -> list[str]:
        config = self.config
        # The same interpreter, with the same import isolation.
        argv = [sys.executable, *_interpreter_flags()]
        self.coverage = self._coverage()
        if self.coverage:
            argv += ["-m", "coverage", "run", "--parallel-mode"]
            rcfile = self.coverage.rcfile
            if not rcfile:
                # This session read no configuration; the inner one must
                # not find one either (data measured differently, say with
                # and without branches, cannot be combined).
                rcfile = os.path.join(workdir, "coveragerc")
                open(rcfile, "w").close()
            argv.append(f"--rcfile={rcfile}")
            if self.coverage.source:
                argv.append("--source=" + ",".join(self.coverage.source))
            if self.coverage.branch:
                argv.append("--branch")
        argv += [
            "-m",
            "pytest",
            "-p",
            __name__,
            "-p",
            "no:cacheprovider",
            f"--rootdir={config.rootpath}",
        ]
        if config.inipath:
            argv += ["-c", str(config.inipath)]
        if config.pluginmanager.has_plugin("_cov"):
            argv.append("--no-cov")  # measured by `coverage run` instead
        for plugin in config.option.plugins or ():
            argv += ["-p", plugin]
        for override in config.option.override_ini or ():
            argv += ["-o", override]
        factory = getattr(config, "_tmp_path_factory", None)
        if factory is not None:
            base = "kernel" if self.count == 1 else f"kernel-{self.number + 1}"
            argv.append(f"--basetemp={factory.getbasetemp() / base}")
        argv += [
            f"--tb={config.option.tbstyle}",
            f"--capture={config.option.capture}",
            f"--import-mode={config.option.importmode}",
        ]
        if config.option.capture == "no":
            # Its output is streamed here: keep the inner pytest's own
            # chatter short (failures are replayed here anyway).
            argv += ["-qq", "--no-header"]
        if config.option.maxfail:
            argv.append(f"--maxfail={config.option.maxfail}")
        if config.option.showlocals:
            argv.append("--showlocals")
        if config.option.runxfail:
            argv.append("--runxfail")
        if config.invocation_params.dir == config.rootpath:
            return argv + self.nodeids
        # Node ids are relative to the rootdir, arguments to the working
        # directory.
        return argv + [os.path.join(config.rootpath, nodeid) for nodeid in self.nodeids]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Selection and options are passed explicitly; the outer addopts
        # (say --cov) must not apply twice.
        for name in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):
            env.pop(name, None)
        env[REPORTS_ENV] = self.reports.path
        if self.claims is not None:
            env[CLAIMS_ENV] = self.claims.directory
            env[KERNEL_NUMBER_ENV] = str(self.number)
        if self.coverage:
            env["COVERAGE_FILE"] = self.coverage.data_file
        return env

    def _receive(self) -> None:
        for data in self.reports.read():
            report = self.config.hook.pytest_report_from_serializable(
                config=self.config, data=data
            )
            if isinstance(report, pytest.TestReport):
                longrepr: object = report.longrepr
                if isinstance(longrepr, list):
                    # A skip's (path, lineno, reason): JSON made it a list.
                    path, lineno, reason = longrepr
                    report.longrepr = (str(path), int(lineno), str(reason))
                self.pending.setdefault(report.nodeid, []).append(report)
                self.ran.add(_module_of(report.nodeid))

    def receive(self) -> bool:
        """Take in the reports sent so far; True if the kernel has gone
        (then every report it sent is in :attr:`pending`)."""
        if self.kernel is None:
            return True
        gone = self.kernel.poll()  # read after polling: nothing is missed
        self._receive()
        return gone

    def _conclude(self) -> None:
        """The kernel has exited: learn its result, and why unreported
        tests fail.  Idempotent."""
        if self.kernel is None or self.result is not None or self.failure is not None:
            return
        try:
            self.result = self.kernel.wait()
        except _kernel.KernelError as exc:
            self.failure = f"the test kernel failed: {exc}"
            return
        self.exit_status = self.result.returncode
        self.failure = (
            f"the test kernel's pytest exited with status {self.exit_status}"
            " without reporting this test" + self.output_tail()
        )

    def output_tail(self) -> str:
        """The end of the inner pytest's stdout and stderr, as text."""
        if self.result is None:
            return ""
        return (
            f"\n--- its stdout (tail) ---\n{_kernel._tail(self.result.stdout, 30)}"
            f"\n--- its stderr (tail) ---\n{_kernel._tail(self.result.stderr, 15)}"
        )

    def finish(self, wait: bool) -> None:
        """Wait for the kernel to exit (when every test was replayed, so
        the inner coverage data is complete) or kill it; clean up."""
        try:
            if self.kernel is not None:
                if wait:
                    # Only coverage saving and the halt remain.
                    while not self.kernel.poll():
                        time.sleep(0.05)
                    self._conclude()
                self.kernel.close()
        finally:
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


def _missing_reports(
    item: pytest.Item, received: list[pytest.TestReport], reason: str
) -> list[pytest.TestReport]:
    """Reports completing a test whose run stopped after ``received``
    (reports already logged): the first phase that is missing fails with
    ``reason``; a test that never started passes setup and fails in call."""
    by_when = {report.when: report for report in received}

    def phase(when: Literal["setup", "call", "teardown"], fails: bool) -> pytest.TestReport:
        def func() -> None:
            if fails:
                pytest.fail(reason, pytrace=False)

        return pytest.TestReport.from_item_and_call(
            item, pytest.CallInfo.from_call(func, when=when)
        )

    reports: list[pytest.TestReport] = []
    if "setup" not in by_when:
        reports.append(phase("setup", False))
    if "call" not in by_when and ("setup" not in by_when or by_when["setup"].passed):
        reports += [phase("call", True), phase("teardown", False)]
    else:
        reports.append(phase("teardown", True))
    return reports


class _Harness:
    """Per-session state: where kernel tests run, and the kernel session."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.inner = os.environ.pop(REPORTS_ENV, None)  # nested sessions must not inherit it
        self.reports_file = (
            open(self.inner, "a", buffering=1)  # noqa: SIM115 (open for the session)
            if self.inner
            else None
        )
        self._where: _Where | None = None
        # item -> "remote" or the reason it fails without running
        self.special: dict[pytest.Item, str] = {}
        self.next_local: dict[pytest.Item, pytest.Item | None] = {}
        self.sessions: list[_KernelSession] = []
        self.claims: _Claims | None = None
        self.claims_dir: str | None = None
        self.remote_count = 0
        # In an inner session among several: the modules this kernel runs,
        # and those another kernel claimed.
        inner_claims = os.environ.pop(CLAIMS_ENV, None)
        self.number = int(os.environ.pop(KERNEL_NUMBER_ENV, "0"))
        self.inner_claims = _Claims(inner_claims) if inner_claims else None
        self.mine: dict[str, bool] = {}
        self.replayed: set[str] = set()
        self.stopped = "the test kernel stopped"

    # -- where kernel tests run ------------------------------------------

    def where(self) -> _Where:
        """Where kernel tests run (decided once per session)."""
        if self._where is None:
            mode = "host" if self.inner else self.config.option.dm_kernel
            if mode == "auto":
                mode = "host" if _kernel.host_has_device_mapper() else "uml"
            if mode == "host":
                if _kernel.host_has_device_mapper():
                    self._where = _Where("host")
                elif self.inner:
                    self._where = _Where(
                        None, reason="no usable device-mapper inside the test kernel"
                    )
                else:
                    self._where = _Where(
                        None,
                        reason="--dm-kernel=host, but this host has no usable device-mapper "
                        "(needs root and /dev/mapper/control)",
                    )
            else:
                try:
                    found = _kernel.find_kernel(self.config.option.dm_kernel_binary)
                except _kernel.KernelUnavailable as exc:
                    self._where = _Where(None, reason=str(exc))
                else:
                    self._where = _Where("uml", kernel=found)
        return self._where

    def no_kernel(self, reason: str) -> NoReturn:
        """Skip the running test for lack of a kernel, or fail it on CI."""
        if in_ci() or self.inner:
            pytest.fail(f"no device-mapper kernel: {reason}", pytrace=False)
        pytest.skip(f"no device-mapper kernel: {reason}; {_HOW_TO_GET}")

    def pytest_report_header(self, config: pytest.Config) -> str:
        if self.inner:
            return "libdm: inner session inside a test kernel"
        where = self.where()
        if where.kind == "host":
            return "libdm: kernel tests run on this host's device-mapper"
        if where.kernel is not None:
            return (
                f"libdm: kernel tests run inside UML kernel {where.kernel.version}"
                f" ({where.kernel.binary})"
            )
        return f"libdm: kernel tests cannot run: {where.reason}" + (
            " (CI: they fail)" if in_ci() else ""
        )

    # -- collection ---------------------------------------------------------

    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        for item in items:
            if item.get_closest_marker("kernel") and item.get_closest_marker("host"):
                raise pytest.UsageError(
                    f"{item.nodeid}: a test cannot be marked both kernel and host"
                )

    # -- the run --------------------------------------------------------

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Generator[None, object, object]:
        # trylast: the innermost wrapper, so the kernel is done (and its
        # coverage data saved) before pytest-cov's wrapper combines data.
        runs = not (session.config.option.collectonly or session.testsfailed)
        if runs:
            self._plan(session)
        try:
            return (yield)
        finally:
            everything = all(n in self.replayed for s in self.sessions[:1] for n in s.nodeids)
            try:
                for s in self.sessions:
                    s.finish(wait=everything)
            finally:
                if self.claims_dir is not None:
                    shutil.rmtree(self.claims_dir, ignore_errors=True)

    def _plan(self, session: pytest.Session) -> None:
        kernel_items = [item for item in session.items if item.get_closest_marker("kernel")]
        if not kernel_items:
            return
        where = self.where()
        if where.kind == "host":
            return  # run here, like any test
        if where.kernel is None:
            for item in kernel_items:
                if in_ci() or self.inner:
                    self.special[item] = (
                        f"no device-mapper kernel (CI=true, so this fails): {where.reason}"
                    )
                else:
                    item.add_marker(
                        pytest.mark.skip(
                            reason=f"no device-mapper kernel: {where.reason}; {_HOW_TO_GET}"
                        )
                    )
        else:
            for item in kernel_items:
                self.special[item] = "remote"
            self.remote_count = len(kernel_items)
        if self.special:
            following: pytest.Item | None = None
            for item in reversed(session.items):
                self.next_local[item] = following
                if item not in self.special:
                    following = item
        if self.remote_count and where.kernel is not None:
            # No more kernels than modules to share among them.
            modules = {_module_of(item.nodeid) for item in kernel_items}
            count = min(_kernel_count(session.config), len(modules))
            if count > 1:
                try:
                    self.claims_dir = _kernel._private_dir()
                except _kernel.KernelError:
                    count = 1  # no shared directory: one kernel runs them all
                else:
                    self.claims = _Claims(self.claims_dir)
            self.sessions = [
                _KernelSession(
                    session.config, kernel_items, where.kernel, number, count, self.claims
                )
                for number in range(count)
            ]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        if self.inner_claims is not None:
            # An inner session among several: run only the modules this
            # kernel claims; another kernel reports the rest.
            module = _module_of(item.nodeid)
            if module not in self.mine:
                self.mine[module] = self.inner_claims.claim(module, self.number)
            return None if self.mine[module] else True
        if not self.special:
            return None
        from _pytest.runner import runtestprotocol

        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        kind = self.special.get(item)
        if kind is None:
            # A local test: tear down only what the next *local* test does
            # not need, since the remote ones in between set nothing up here.
            runtestprotocol(item, nextitem=self.next_local.get(item))
        elif kind == "remote":
            self._replay(item)
        else:
            for report in _missing_reports(item, [], kind):
                ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _owner(self, nodeid: str) -> _KernelSession | None:
        """The kernel that runs this test: the one that claimed its module
        (None while none has), or the only one."""
        if self.claims is None:
            return self.sessions[0]
        number = self.claims.owner(_module_of(nodeid))
        return None if number is None else self.sessions[number]

    def _reports_for(self, nodeid: str) -> Iterator[pytest.TestReport]:
        """Yield this test's reports as they arrive, from whichever kernel
        runs it; stop after its teardown report, or when that kernel has
        gone (or all have, and none claimed it): then :attr:`stopped` says
        why."""
        self.stopped = "the test kernel stopped"
        while True:
            gone = {s.number: s.receive() for s in self.sessions}
            for s in self.sessions:
                for report in s.pending.pop(nodeid, ()):
                    yield report
                    if report.when == "teardown":
                        return
            owner = self._owner(nodeid)
            if owner is not None and gone[owner.number]:
                owner._conclude()
                self.stopped = owner.failure or self.stopped
                return
            if owner is None and all(gone.values()):
                for s in self.sessions:
                    s._conclude()
                reasons = [s.failure for s in self.sessions if s.failure]
                self.stopped = reasons[0] if reasons else "no test kernel ran this test"
                return
            time.sleep(0.05)

    def _replay(self, item: pytest.Item) -> None:
        assert self.sessions
        received: list[pytest.TestReport] = []
        for report in self._reports_for(item.nodeid):
            received.append(report)
            item.ihook.pytest_runtest_logreport(report=report)
        self.replayed.add(item.nodeid)
        if received and received[-1].when == "teardown":
            return
        for report in _missing_reports(item, received, self.stopped):
            item.ihook.pytest_runtest_logreport(report=report)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        for s in self.sessions:
            which = "the test kernel" if s.count == 1 else f"test kernel {s.number + 1}"
            if s.exit_status not in (None, 0, 1, 5):
                # Every test may have been reported and still the inner
                # session went wrong (say an error in a session fixture's
                # teardown): show it rather than lose it.  (5: a kernel
                # among several that another left no module.)
                terminalreporter.write_sep("=", f"libdm: {which}'s pytest", yellow=True)
                terminalreporter.write_line(f"exited with status {s.exit_status}{s.output_tail()}")
            elif terminalreporter.verbosity >= 0:
                ran = "" if s.result is None else f" in {s.result.duration:.1f} s, boot included"
                status = (
                    ""
                    if s.exit_status is None
                    else f"; its pytest exited with status {s.exit_status}"
                )
                tests = (
                    f"{len(s.nodeids)} kernel test(s)"
                    if s.count == 1
                    else f"kernel tests of {len(s.ran)} module(s)"
                )
                terminalreporter.write_line(
                    f"libdm: {tests} ran inside UML kernel {s.info.version}"
                    f"{'' if s.count == 1 else f' (kernel {s.number + 1} of {s.count})'}"
                    f"{ran}{status}"
                )

    # -- the inner session --------------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.reports_file is None:
            return
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.reports_file.write(json.dumps(data, default=repr) + "\n")

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if self.inner and item.get_closest_marker("host"):
            pytest.skip("host tests boot kernels themselves; they run on the host only")

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.reports_file is not None:
            self.reports_file.close()


# -- fixtures -----------------------------------------------------------------


@pytest.fixture
def dm_prefix() -> Iterator[str]:
    """A device-name prefix unique to this test: ``libdmtest-<session
    token>-<n>-``.

    After the test, also when it failed, every device-mapper device whose
    name starts with it is removed (mounts of them first, holders before
    the devices they hold; see :func:`libdm.testing.cleanup.cleanup_devices`).
    A device that cannot be removed makes the test error in teardown.
    """
    prefix = f"libdmtest-{_session_token}-{next(_test_counter)}-"
    yield prefix
    if _kernel.host_has_device_mapper():
        _cleanup.cleanup_devices(prefix)


@pytest.fixture
def dm_name(dm_prefix: str) -> Callable[..., str]:
    """A factory of unique device names under this test's :func:`dm_prefix`.

    ``dm_name("pool")`` returns ``"libdmtest-<token>-<n>-pool"``; asking
    for the same suffix again gives ``...-pool-2`` and so on.  Raises
    ValueError for an empty suffix, one with ``/``, or a name longer than
    device-mapper's 127 characters.  The devices are removed after the test.
    """
    given: set[str] = set()

    def make(suffix: str = "dev") -> str:
        if not suffix or "/" in suffix:
            raise ValueError(f"bad device name suffix {suffix!r}")
        name, n = dm_prefix + suffix, 1
        while name in given:
            n += 1
            name = f"{dm_prefix}{suffix}-{n}"
        if len(name) > _DM_NAME_MAX:
            raise ValueError(f"device name {name!r} is longer than {_DM_NAME_MAX} characters")
        given.add(name)
        return name

    return make


@pytest.fixture(autouse=True)
def _libdm_kernel_cleanup(request: pytest.FixtureRequest) -> Iterator[None]:
    # For kernel tests only: after the test (and after dm_prefix removed its
    # devices), unmount what is mounted below tmp_path and detach loop
    # devices backed by files below it.
    if not request.node.get_closest_marker("kernel") or not _kernel.host_has_device_mapper():
        yield
        return
    tmp_path = request.getfixturevalue("tmp_path")
    yield
    failures: list[str] = []
    steps: list[Callable[[], object]] = [
        lambda: _cleanup.unmount(under=tmp_path),
        lambda: _cleanup.detach_loops(tmp_path),
    ]
    for step in steps:
        try:
            step()
        except _cleanup.CleanupError as exc:
            failures += exc.failures
    if failures:
        raise _cleanup.CleanupError(failures)


@pytest.fixture
def uml_kernel(request: pytest.FixtureRequest) -> _kernel.KernelInfo:
    """The :class:`~libdm.testing.kernel.KernelInfo` of the UML kernel
    that ``--dm-kernel-binary`` (or the default) names, for ``host``
    tests that boot kernels themselves.  Without one the test is skipped
    (fails when CI=true)."""
    try:
        return _kernel.find_kernel(request.config.option.dm_kernel_binary)
    except _kernel.KernelUnavailable as exc:
        reason = str(exc)
    _harness(request.config).no_kernel(reason)  # outside except: no chained traceback


@pytest.fixture
def run_in_kernel(
    request: pytest.FixtureRequest, uml_kernel: _kernel.KernelInfo
) -> Callable[..., _kernel.KernelResult]:
    """A function running one command in a fresh UML kernel, for
    ``host``-marked tests that boot kernels themselves (power cuts: run
    again on the same backing files).

    ``run_in_kernel(command, **kwargs)`` takes the arguments of
    :func:`libdm.testing.kernel.run` (the kernel of :func:`uml_kernel` and
    ``--dm-kernel-mem`` are the defaults) and returns its
    :class:`~libdm.testing.kernel.KernelResult`.  With no kernel at all the
    test is skipped (fails when CI=true); a kernel that fails to boot or
    times out raises :class:`~libdm.testing.kernel.KernelError`.
    """
    option = request.config.option

    def run(command: Sequence[_kernel.Arg], **kwargs: Any) -> _kernel.KernelResult:
        kwargs.setdefault("binary", uml_kernel.binary)
        kwargs.setdefault("mem", option.dm_kernel_mem)
        return _kernel.run(command, **kwargs)

    return run
