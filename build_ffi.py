"""Build the out-of-line (API mode) cffi module ``libdm._libdevmapper``.

The C surface is declared in ordered header fragments under
``libdm/_decl/`` (one file per area of libdevmapper.h), so the binding grows
by adding a fragment rather than by editing one long cdef.  The fragments are
copied from the real signatures in ``libdevmapper.h``; compiling in API mode
makes the C compiler check them against the installed header.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from cffi import FFI  # type: ignore[import-untyped]  # cffi ships no types

HERE = os.path.dirname(os.path.abspath(__file__))
DECL_DIR = os.path.join(HERE, "libdm", "_decl")

# Order matters: types before the functions that use them.
FRAGMENTS: list[str] = [
    "types.h",
    "task.h",
    "udev.h",
    "library.h",
    "log.h",
    "events.h",
    "lock.h",
    "blockdev.h",
]

# libdevmapper's logger is variadic, which cffi cannot call back into
# Python directly.  This shim formats each message in C and hands the
# finished string to an ``extern "Python"`` callback.  It also filters by
# level before formatting, so debug chatter costs nothing unless asked for.
C_SOURCE = r"""
#include <stdarg.h>
#include <stdio.h>
#include <libdevmapper.h>
#include <linux/dm-ioctl.h>  /* DM_NAME_LEN, DM_UUID_LEN, DM_MAX_TYPE_NAME */
#include <linux/fs.h>        /* BLKGETSIZE64, BLKDISCARD, FITRIM */
#include <linux/loop.h>      /* LOOP_*, LO_FLAGS_*, struct loop_info64 */
#include <linux/major.h>     /* LOOP_MAJOR */

static void libdm_py_log(int level, const char *file, int line,
                         int dm_errno_or_class, const char *msg);

/* libdevmapper's private log levels (lib/log.h); level carries flag bits. */
#define LIBDM_LOG_LEVEL_MASK 0x7
static int libdm_forward_level = 4; /* _LOG_WARN */

static void libdm_log_shim(int level, const char *file, int line,
                           int dm_errno_or_class, const char *f, ...)
{
    char buf[1024];
    va_list ap;
    int lvl = level & LIBDM_LOG_LEVEL_MASK;

    if (lvl > libdm_forward_level)
        return;
    va_start(ap, f);
    vsnprintf(buf, sizeof(buf), f, ap);
    va_end(ap);
    libdm_py_log(lvl, file, line, dm_errno_or_class, buf);
}

static void libdm_log_install(int forward_level)
{
    libdm_forward_level = forward_level;
    dm_log_with_errno_init(libdm_log_shim);
}

static void libdm_log_set_level(int forward_level)
{
    libdm_forward_level = forward_level;
}

static void libdm_log_restore_default(void)
{
    dm_log_with_errno_init(NULL);
}

/* The library lock: libdevmapper is not thread-safe, so every task runs
 * under one process-wide recursive mutex.  A pthread mutex takes no system
 * call when uncontended, where Python's RLock reads the clock on every
 * acquire, and in the test kernel each such read is a trapped syscall.
 * The calls release the GIL, so a thread waiting here blocks no other. */
#include <pthread.h>

static pthread_mutex_t libdm_mutex;

static void libdm_lock_init(void)
{
    pthread_mutexattr_t attr;

    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&libdm_mutex, &attr);
    pthread_mutexattr_destroy(&attr);
}

static void libdm_lock(void)
{
    pthread_mutex_lock(&libdm_mutex);
}

static void libdm_unlock(void)
{
    pthread_mutex_unlock(&libdm_mutex);
}

/* Set a udev cookie, run the task, wait on the cookie, in one C call: a
 * Python exception (a signal handler, KeyboardInterrupt) can only be raised
 * between calls, and one raised between dm_task_set_cookie and
 * dm_udev_wait would leak the cookie's SysV semaphore. */
static int libdm_run_with_cookie(struct dm_task *dmt, uint16_t flags, int *no_cookie)
{
    uint32_t cookie = 0;
    int ok;

    *no_cookie = !dm_task_set_cookie(dmt, &cookie, flags);
    if (*no_cookie)
        return 0;
    ok = dm_task_run(dmt);
    dm_udev_wait(cookie);
    return ok;
}

/* Arm event polling on a control fd of our own (DM_DEV_ARM_POLL, driver
 * 4.37+).  libdevmapper keeps its control fd private, and a blocking
 * DM_DEVICE_WAITEVENT task cannot time out, so waiting with a timeout is
 * done by arming our fd and poll()ing it. */
#include <string.h>
#include <sys/ioctl.h>

static int libdm_arm_poll(int fd)
{
    struct dm_ioctl dmi;

    memset(&dmi, 0, sizeof(dmi));
    dmi.version[0] = DM_VERSION_MAJOR;
    dmi.version[1] = DM_VERSION_MINOR;
    dmi.version[2] = DM_VERSION_PATCHLEVEL;
    dmi.data_size = sizeof(dmi);
    return ioctl(fd, DM_DEV_ARM_POLL, &dmi);
}
"""


def _pkg_config(*args: str) -> list[str] | None:
    """Return pkg-config's words for devmapper, or None when unavailable."""
    try:
        out = subprocess.run(
            ["pkg-config", *args, "devmapper"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out)


def _build_options() -> dict[str, list[str]]:
    cflags = _pkg_config("--cflags") or []
    libs = _pkg_config("--libs")
    if libs is None:
        libs = ["-ldevmapper"]
    return {
        "include_dirs": [f[2:] for f in cflags if f.startswith("-I")],
        "extra_compile_args": [f for f in cflags if not f.startswith("-I")],
        "library_dirs": [f[2:] for f in libs if f.startswith("-L")],
        "libraries": [f[2:] for f in libs if f.startswith("-l")],
    }


def read_declarations() -> str:
    parts = []
    for name in FRAGMENTS:
        with open(os.path.join(DECL_DIR, name), encoding="utf-8") as fh:
            parts.append(fh.read())
    return "\n".join(parts)


ffibuilder = FFI()
ffibuilder.cdef(read_declarations())
ffibuilder.set_source("libdm._libdevmapper", C_SOURCE, **_build_options())

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=HERE, verbose=True)
