"""Run a command inside a throwaway User-Mode Linux kernel.

The host running the tests may have no device-mapper at all.  A UML kernel
(Debian's ``user-mode-linux`` package) is an ordinary process that boots in
a few seconds with the host's own filesystem as its root (``hostfs``), so
inside it the same Python, virtualenv, compiled extensions and files are
there, read-write, and the kernel modules (dm-mod, dm-thin-pool, loop, ...)
load as usual.

:func:`run` boots one kernel, loads modules, runs one command with a given
working directory and environment, and powers the kernel off.  The command's
exit status, stdout and stderr come back through files in a private
temporary directory on the host (hostfs writes go straight to the host
file, which is also what makes live streaming possible), and the directory
is removed afterwards.

The kernel is stopped with ``halt -f`` right after the command: devices are
*not* torn down and nothing is synced first (unless asked), exactly like a
power cut.  Booting again on the same backing files is how crash tests
recover.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import IO, TypeAlias

#: What a command line is made of.
Arg: TypeAlias = "str | os.PathLike[str]"
#: Where streamed output goes: a text stream, or a function returning one
#: (looked up at each write, so that pytest's capture is followed).
Sink: TypeAlias = "IO[str] | Callable[[], IO[str]]"

__all__ = [
    "DEFAULT_BINARY",
    "DEFAULT_MODULES",
    "DEFAULT_MODULES_ROOT",
    "KernelCrashed",
    "KernelError",
    "KernelInfo",
    "KernelProcess",
    "KernelResult",
    "KernelTimeout",
    "KernelUnavailable",
    "find_kernel",
    "host_has_device_mapper",
    "in_test_kernel",
    "run",
    "start",
]

#: Where Debian's ``user-mode-linux`` package puts the kernel; the
#: ``LIBDM_UML_BINARY`` environment variable overrides it.
DEFAULT_BINARY = "/usr/bin/linux.uml"
#: Where its modules live, one directory per kernel version;
#: ``LIBDM_UML_MODULES`` overrides it.
DEFAULT_MODULES_ROOT = "/usr/lib/uml/modules"
#: Modules loaded before the command runs.
DEFAULT_MODULES = ("dm-mod", "dm-thin-pool", "dm-snapshot", "dm-flakey", "dm-zero", "loop")

#: Set in the environment of every command run inside a test kernel.
IN_KERNEL_ENV = "LIBDM_TESTING_IN_KERNEL"

# Filesystems the init script mounts over host directories: a host path
# below one of these is hidden inside the kernel, so the private work
# directory must not live there.
_SHADOWED = ("/run", "/dev", "/proc", "/sys")
_INSTALL_HINT = (
    "install Debian's user-mode-linux and kmod packages (apt-get install user-mode-linux kmod)"
)
_AVX512_FEATURES = ("AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL")
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class KernelError(Exception):
    """A test kernel could not run the command to completion.

    Attributes:
        reason: one line saying what went wrong.
        console: the kernel's console log (boot messages, kernel log and
            the init script's own messages), possibly empty.
        result: a :class:`KernelResult` with whatever output the command
            produced before the failure, or ``None`` if it never started.
    """

    def __init__(self, reason: str, console: str = "", result: KernelResult | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.console = console
        self.result = result

    def __str__(self) -> str:
        text = self.reason
        tail = _tail(self.console, 25)
        if tail:
            text += "\n--- last lines of the kernel console ---\n" + tail
        if self.result is not None and self.result.stderr.strip():
            text += "\n--- last lines of the command's stderr ---\n" + _tail(
                self.result.stderr, 25
            )
        return text


class KernelUnavailable(KernelError):
    """No test kernel can be had: the UML binary, its modules or ``modprobe``
    are missing, the kernel did not boot, or a module failed to load."""


class KernelTimeout(KernelError):
    """The kernel was still running when the timeout expired and was killed."""


class KernelCrashed(KernelError):
    """The kernel stopped while the command was still running (a panic, an
    out-of-memory kill of init, or the command halting the kernel itself)."""


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    """A usable UML kernel.

    Attributes:
        binary: path of the kernel executable.
        version: its release string (``uname -r`` inside), e.g. ``"6.1.176"``.
        modules_dir: the directory holding that release's modules.
    """

    binary: str
    version: str
    modules_dir: str


@dataclasses.dataclass(frozen=True)
class KernelResult:
    """What a command run inside a test kernel produced.

    Attributes:
        command: the command as run.
        returncode: its exit status (128+N when killed by signal N).
        stdout, stderr: its output, decoded as UTF-8 (undecodable bytes
            replaced).
        console: the kernel's console log.
        duration: wall-clock seconds from starting the kernel to its exit.
    """

    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    console: str
    duration: float

    def check_returncode(self) -> None:
        """Raise :class:`subprocess.CalledProcessError` if the exit status
        is not zero."""
        if self.returncode:
            raise subprocess.CalledProcessError(
                self.returncode, list(self.command), self.stdout, self.stderr
            )


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) if text else ""


def in_test_kernel() -> bool:
    """Return True when this process runs inside a kernel started by this
    module (such commands get ``LIBDM_TESTING_IN_KERNEL=1``)."""
    return os.environ.get(IN_KERNEL_ENV) == "1"


def host_has_device_mapper() -> bool:
    """Return True if device-mapper can be used directly here: running as
    root, and ``/dev/mapper/control`` is a character device that opens.

    Never raises.
    """
    if os.geteuid() != 0:
        return False
    path = "/dev/mapper/control"
    try:
        if not stat.S_ISCHR(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        # A stale node without the driver behind it fails to open (ENODEV).
        return False
    os.close(fd)
    return True


def find_kernel(
    binary: str | None = None, modules_root: str | None = None, *, need_modprobe: bool = True
) -> KernelInfo:
    """Locate a usable UML kernel and its modules.

    Args:
        binary: the kernel executable; default ``$LIBDM_UML_BINARY`` or
            :data:`DEFAULT_BINARY`.
        modules_root: the directory holding one module directory per
            kernel version; default ``$LIBDM_UML_MODULES`` or
            :data:`DEFAULT_MODULES_ROOT`.
        need_modprobe: also require ``modprobe`` (needed to load modules).

    Returns:
        A :class:`KernelInfo`.

    Raises:
        KernelUnavailable: with a reason saying what is missing and how to
            get it (also when called inside a test kernel: they do not nest).
    """
    if in_test_kernel():
        raise KernelUnavailable("already inside a test kernel; test kernels do not nest")
    binary = binary or os.environ.get("LIBDM_UML_BINARY") or DEFAULT_BINARY
    modules_root = modules_root or os.environ.get("LIBDM_UML_MODULES") or DEFAULT_MODULES_ROOT
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise KernelUnavailable(
            f"no UML kernel at {binary}: {_INSTALL_HINT}, or set LIBDM_UML_BINARY"
        )
    try:
        proc = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"{binary} --version failed: {exc}") from exc
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version or len(version.split()) != 1:
        raise KernelUnavailable(
            f"{binary} --version printed no release (exit status {proc.returncode})"
        )
    modules_dir = os.path.join(modules_root, version)
    if not os.path.isdir(modules_dir):
        raise KernelUnavailable(
            f"no modules for UML kernel {version} in {modules_dir}: {_INSTALL_HINT}"
        )
    if need_modprobe and not shutil.which("modprobe", path=_SYSTEM_PATH):
        raise KernelUnavailable(f"modprobe not found: {_INSTALL_HINT}")
    return KernelInfo(binary, version, modules_dir)


def _xstate_shim() -> str | None:
    """The preload library that lets UML run on a host whose XSAVE area is
    larger than the one UML was built for (AVX-512, AMX; see
    ``xstate_shim.c``): built once per source version into a cache
    directory, or ``None`` where no C compiler is installed (UML then runs
    as it is, which works on hosts without those extensions)."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xstate_shim.c")
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "libdm-testing"
    )
    lib = os.path.join(cache, f"xstate_shim-{digest}.so")
    if os.path.exists(lib):
        return lib
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    os.makedirs(cache, exist_ok=True)
    tmp = f"{lib}.{os.getpid()}.tmp"
    proc = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", tmp, source, "-ldl"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise KernelUnavailable(f"could not build the UML XSAVE shim: {proc.stderr.strip()}")
    os.replace(tmp, lib)
    return lib


def _kernel_env() -> dict[str, str]:
    """The UML process's own environment: the XSAVE shim preloaded."""
    env = dict(os.environ)
    shim = _xstate_shim()
    if shim is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, (shim, env.get("LD_PRELOAD"))))
    return env


def _private_dir() -> str:
    """Make the private work directory: somewhere the kernel sees too (not
    under a directory the init script mounts over) and whose path has no
    whitespace (it goes on the kernel command line)."""
    for base in (None, "/var/tmp", "/tmp"):
        path = tempfile.mkdtemp(prefix="libdm-uml-", dir=base)
        real = os.path.realpath(path)
        hidden = any(real == d or real.startswith(d + "/") for d in _SHADOWED)
        if not hidden and not any(c.isspace() for c in real):
            return real
        os.rmdir(path)
    raise KernelUnavailable(
        "no temporary directory visible inside the kernel (TMPDIR is under /run?)"
    )


def _command_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The command's environment: ``env`` (default: this process's), with
    the directory of the running Python first on PATH so that ``python``
    and the virtualenv's scripts resolve to real binaries rather than to
    slow shims, and the in-kernel marker set."""
    result = dict(os.environ if env is None else env)
    bindir = os.path.dirname(sys.executable)
    path = result.get("PATH") or _SYSTEM_PATH
    parts = path.split(os.pathsep)
    if bindir and parts[0] != bindir:
        result["PATH"] = os.pathsep.join([bindir] + [p for p in parts if p != bindir])
    else:
        result["PATH"] = path
    result[IN_KERNEL_ENV] = "1"
    # UML switches only the legacy FP/SSE/AVX state between the threads of
    # a process: keep glibc's string functions off the AVX-512 registers.
    tunables = [t for t in result.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.cpu.hwcaps=") for t in tunables):
        tunables.append("glibc.cpu.hwcaps=" + ",".join(f"-{f}" for f in _AVX512_FEATURES))
    result["GLIBC_TUNABLES"] = ":".join(tunables)
    return result


def _std_streams() -> tuple[Sink, Sink]:
    """This process's stdout and stderr, looked up at each write."""
    return (lambda: sys.stdout), (lambda: sys.stderr)


def _autoload_lines(modprobe: str) -> str:
    """Init-script lines that let the kernel load modules on demand.

    The kernel's ``request_module`` (opening a block device of an unknown
    major, a table naming a target type not loaded yet, ...) runs the
    program named in ``/proc/sys/kernel/modprobe``.  Its default,
    ``/sbin/modprobe``, finds no ``/lib/modules/<release>`` on the host
    root, so nothing autoloads; a helper in the private /run that points
    modprobe at the module tree built there makes it work as on an
    ordinary machine, without writing outside this kernel.
    """
    helper = "/run/libdm-modules/modprobe"
    return f"""# Module autoloading, as on an ordinary machine.
printf '#!/bin/sh\\nexec %s -d /run/libdm-modules "$@"\\n' {shlex.quote(modprobe)} > {helper}
chmod 0755 {helper}
echo {helper} > /proc/sys/kernel/modprobe || failed="$failed (autoloading)"
"""


def _init_script(
    workdir: str,
    modules_dir: str,
    modules: Sequence[str],
    command: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    sync_before_halt: bool,
    autoload_modprobe: str | None = None,
) -> str:
    q = shlex.quote
    assignments = " ".join(q(f"{k}={v}") for k, v in sorted(env.items()))
    argv = " ".join(q(a) for a in command)
    mods = " ".join(q(m) for m in modules)
    halt = "sync; halt -f" if sync_before_halt else "halt -f -n || halt -f"
    autoload = _autoload_lines(autoload_modprobe) if autoload_modprobe else ""
    return f"""#!/bin/sh
# Init process of a test kernel, generated by libdm.testing.kernel.
# Output of this script goes to the kernel console.
W={q(workdir)}
PATH={_SYSTEM_PATH}
export PATH
stop() {{
    # Power off without tearing anything down: a deliberate power cut.
    {halt} || poweroff -f
    echo "libdm-init: could not halt" >&2
    exec sleep 100000
}}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Private /run and /dev/shm: what tools write there stays in this kernel.
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock /dev/shm
mount -t tmpfs tmpfs /dev/shm
# modprobe wants /lib/modules/<release>; build that tree in /run rather
# than on the host.
mkdir -p /run/libdm-modules/lib/modules
ln -s {q(modules_dir)} "/run/libdm-modules/lib/modules/$(uname -r)"
failed=
for m in {mods}; do
    modprobe -d /run/libdm-modules "$m" || failed="$failed $m"
done
{autoload}if [ -n "$failed" ]; then
    echo "$failed" > "$W/modules-failed"
    stop
fi
: > "$W/started"
( cd {q(cwd)} && exec env -i {assignments} {argv} ) \\
    < /dev/null > "$W/stdout" 2> "$W/stderr"
echo $? > "$W/status.new" && mv "$W/status.new" "$W/status"
stop
"""


class _Tail:
    """Copy what is appended to a host file to a text stream."""

    def __init__(self, path: str, sink: Sink) -> None:
        self.path = path
        self.sink = sink
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def pump(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self.offset += len(data)
        text = self.decoder.decode(data, final)
        if text:
            sink = self.sink() if callable(self.sink) else self.sink
            sink.write(text)
            sink.flush()


class KernelProcess:
    """A running test kernel, as returned by :func:`start`.

    Use it as a context manager, or call :meth:`close` when done: that
    kills the kernel if it still runs and removes the private directory.

    Attributes:
        command: the command it runs.
        workdir: the private host directory (removed by :meth:`close`).
        info: the :class:`KernelInfo` booted.
    """

    def __init__(
        self,
        command: tuple[str, ...],
        info: KernelInfo,
        workdir: str,
        proc: subprocess.Popen[bytes],
        deadline: float | None,
        stream: bool | tuple[Sink, Sink],
        timeout: float | None,
    ) -> None:
        self.command = command
        self.info = info
        self.workdir = workdir
        self._proc = proc
        self._deadline = deadline
        self._timeout = timeout
        self._began = time.monotonic()
        self._ended: float | None = None
        self._timed_out = False
        self._lock = threading.Lock()
        self._tails: list[_Tail] = []
        sinks = _std_streams() if stream is True else stream or None
        if sinks is not None:
            out, err = sinks
            self._tails = [_Tail(self.path("stdout"), out), _Tail(self.path("stderr"), err)]
        # The watchdog enforces the timeout even when nobody polls, and
        # copies output to the caller while streaming.
        self._watchdog = threading.Thread(
            target=self._watch, name="libdm-uml-watchdog", daemon=True
        )
        self._watchdog.start()

    def path(self, name: str) -> str:
        """Return the host path of a file in the private directory."""
        return os.path.join(self.workdir, name)

    def _watch(self) -> None:
        interval = 0.05 if self._tails else 0.1
        while True:
            try:
                self._proc.wait(interval)
                break
            except subprocess.TimeoutExpired:
                pass
            for t in self._tails:
                t.pump()
            if self._deadline is not None and time.monotonic() > self._deadline:
                self._timed_out = True
                self.kill()
        self._ended = time.monotonic()
        for t in self._tails:
            t.pump(final=True)

    def poll(self) -> bool:
        """Return True once the kernel has exited (and streamed output is
        flushed)."""
        return not self._watchdog.is_alive()

    def kill(self) -> None:
        """Kill the kernel at once (all its host processes).  Does nothing
        if it has exited."""
        with self._lock:
            if self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> KernelResult:
        """Wait for the kernel to exit and return the command's result.

        Args:
            timeout: seconds to wait here; when it expires the kernel is
                killed (the overall timeout given to :func:`start` applies
                as well).

        Returns:
            A :class:`KernelResult`.

        Raises:
            KernelTimeout: a timeout expired; the kernel was killed.
            KernelUnavailable: the kernel did not boot, or a module did not
                load; the command did not run.
            KernelCrashed: the kernel stopped before the command finished.
        """
        self._watchdog.join(timeout)
        if self._watchdog.is_alive():
            self._timed_out = True
            self._timeout = timeout
            self.kill()
            self._watchdog.join()
        return self._result()

    def _read(self, name: str) -> str:
        try:
            with open(self.path(name), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _result(self) -> KernelResult:
        console = self._read("console")
        status = self._read("status").strip()
        partial = KernelResult(
            command=self.command,
            returncode=int(status) if status else -1,
            stdout=self._read("stdout"),
            stderr=self._read("stderr"),
            console=console,
            duration=(self._ended or time.monotonic()) - self._began,
        )
        if status:
            return partial
        if self._timed_out:
            raise KernelTimeout(
                f"test kernel killed when its timeout ({self._timeout} s) expired",
                console,
                partial,
            )
        failed = self._read("modules-failed").split()
        if failed:
            raise KernelUnavailable(
                f"module(s) {', '.join(failed)} did not load in UML kernel {self.info.version}",
                console,
            )
        if not os.path.exists(self.path("started")):
            raise KernelUnavailable(
                f"UML kernel {self.info.binary} exited (status {self._proc.returncode})"
                " before running the command",
                console,
            )
        raise KernelCrashed(
            "test kernel stopped before the command finished"
            f" (kernel exit status {self._proc.returncode})",
            console,
            partial,
        )

    def close(self) -> None:
        """Kill the kernel if it still runs and remove the private
        directory.  Safe to call twice."""
        self.kill()
        self._watchdog.join()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KernelProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start(
    command: Sequence[Arg],
    *,
    cwd: Arg | None = None,
    env: Mapping[str, str] | None = None,
    modules: Sequence[str] = DEFAULT_MODULES,
    mem: str = "1G",
    kernel_args: Sequence[str] = (),
    timeout: float | None = 600.0,
    stream: bool | tuple[Sink, Sink] = False,
    sync_before_halt: bool = False,
    binary: str | None = None,
    modules_root: str | None = None,
    autoload: bool = False,
) -> KernelProcess:
    """Boot a test kernel running ``command`` and return at once.

    See :func:`run` for the arguments.  The caller must :meth:`~KernelProcess.close`
    the returned :class:`KernelProcess` (or use it in a ``with`` block).

    Raises:
        KernelUnavailable: no kernel (see :func:`find_kernel`).
        TypeError: ``command`` is a string rather than a sequence.
    """
    if isinstance(command, (str, bytes)):
        raise TypeError("command must be a sequence of arguments, e.g. ['sh', '-c', '...']")
    argv_command = tuple(os.fspath(a) for a in command)
    if not argv_command:
        raise ValueError("command is empty")
    info = find_kernel(binary, modules_root, need_modprobe=bool(modules) or autoload)
    modprobe = shutil.which("modprobe", path=_SYSTEM_PATH) if autoload else None
    directory = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
    workdir = _private_dir()
    try:
        init = os.path.join(workdir, "init")
        cmd_env = _command_env(env)
        cmd_env["PWD"] = directory
        with open(init, "w") as f:
            f.write(
                _init_script(
                    workdir,
                    info.modules_dir,
                    modules,
                    argv_command,
                    directory,
                    cmd_env,
                    sync_before_halt,
                    modprobe,
                )
            )
        os.chmod(init, 0o700)
        argv = [
            info.binary,
            "rootfstype=hostfs",
            "rootflags=/",
            "rw",
            f"mem={mem}",
            f"init={init}",
            # Consoles off the terminal; console 0 writes to our stderr.
            "con=null",
            "con0=null,fd:2",
            # Keep the pid file and mconsole socket out of $HOME.
            f"uml_dir={workdir}",
            "umid=kernel",
            *kernel_args,
        ]
        with open(os.path.join(workdir, "console"), "wb") as console:
            proc = subprocess.Popen(
                argv,
                env=_kernel_env(),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                # Its own process group, so that kill() reaches every host
                # process of the kernel; its cwd is the private directory,
                # so that a core dump on panic is cleaned up with it.
                start_new_session=True,
                cwd=workdir,
            )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    deadline = None if timeout is None else time.monotonic() + timeout
    return KernelProcess(argv_command, info, workdir, proc, deadline, stream, timeout)


def run(
    command: Sequence[Arg],
    *,
    cwd: Arg | None = None,
    env: Mapping[str, str] | None = None,
    modules: Sequence[str] = DEFAULT_MODULES,
    mem: str = "1G",
    kernel_args: Sequence[str] = (),
    timeout: float | None = 600.0,
    stream: bool | tuple[Sink, Sink] = False,
    sync_before_halt: bool = False,
    binary: str | None = None,
    modules_root: str | None = None,
    autoload: bool = False,
) -> KernelResult:
    """Boot a UML kernel, run one command inside it as root, power it off.

    The host's filesystem is the kernel's root, read-write: files the
    command writes are on the host afterwards.  Inside, ``/proc``, ``/sys``,
    ``/dev`` (devtmpfs), and private tmpfs on ``/run`` and ``/dev/shm`` are
    mounted; there is no udev.  Nothing else is left on the host.

    Args:
        command: program and arguments (a sequence, not a shell string).
        cwd: working directory of the command (default: the current one).
        env: the command's whole environment (default: this process's).
            Either way the directory of ``sys.executable`` is put first on
            PATH, and ``LIBDM_TESTING_IN_KERNEL=1`` is added.
        modules: kernel modules to load first; if one fails,
            :class:`KernelUnavailable` is raised and the command does not run.
        mem: the kernel's memory size (``mem=`` argument), e.g. ``"512M"``.
        kernel_args: extra kernel command-line arguments, e.g.
            ``["ubd1=/path/disk.img"]``.
        timeout: seconds, boot included, after which the kernel is killed
            (``None``: no limit).
        stream: True to copy the command's stdout and stderr to
            ``sys.stdout``/``sys.stderr`` while it runs, or a pair of text
            streams to copy them to.
        sync_before_halt: run ``sync`` before powering off.  By default the
            kernel halts without syncing or tearing devices down, like a
            power cut; data still in the kernel's page cache is lost (files
            the command wrote on the host filesystem are not affected:
            those writes reach the host at once).
        binary, modules_root: see :func:`find_kernel`.
        autoload: let the kernel load modules on demand, as an ordinary
            machine does (opening ``9:N`` loads md and makes ``mdN``, a
            table naming an unloaded target type loads it).  By default it
            cannot: only ``modules`` are loaded.

    Returns:
        A :class:`KernelResult`; a non-zero exit status is not an error
        (see :meth:`KernelResult.check_returncode`).

    Raises:
        KernelUnavailable: no kernel, it did not boot, or a module failed.
        KernelTimeout: ``timeout`` expired.
        KernelCrashed: the kernel stopped before the command finished.
    """
    with start(
        command,
        cwd=cwd,
        env=env,
        modules=modules,
        mem=mem,
        kernel_args=kernel_args,
        timeout=timeout,
        stream=stream,
        sync_before_halt=sync_before_halt,
        binary=binary,
        modules_root=modules_root,
        autoload=autoload,
    ) as kernel:
        return kernel.wait()
