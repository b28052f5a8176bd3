"""Monitor commands: the service that watches every registered pool
(``libdm monitor serve``, as dmeventd does for LVM) and the registrations
it reads (``register``, ``unregister``, ``ls``)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TypedDict

from libdm._signals import stop_on_signals
from libdm.cli import output
from libdm.cli.args import (
    Subparsers,
    command,
    growth_arguments,
    growth_options,
    positive_seconds,
)
from libdm.cli.common import emit, pool_directory

__all__ = ["register"]


class _Registered(TypedDict):
    """One registration, as ``libdm monitor ls --json`` prints it; a file
    that is not a valid registration has ``invalid`` (why) and no pool."""

    pool: str | None
    file: str
    threshold: int | None
    percent: int | None
    watched: bool
    invalid: str | None


def cmd_serve(args: argparse.Namespace) -> None:
    from libdm.service import MonitorService, journal_handler

    # A service logs every libdm line once, in the journal's format: the
    # command's own stderr handlers step aside while it runs.
    loggers = [logging.getLogger(name) for name in ("libdm", "libdm.monitor")]
    saved_handlers = [(lg, list(lg.handlers), lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers = []
    handler = journal_handler()
    loggers[0].addHandler(handler)
    loggers[0].setLevel(logging.DEBUG if args.debug else logging.INFO)
    loggers[1].setLevel(logging.NOTSET)
    service = MonitorService(args.config_dir, rescan=args.rescan, interval=args.interval)
    try:
        with stop_on_signals(service.stop):
            service.run()
    finally:
        for lg, handlers, level in saved_handlers:
            lg.handlers = handlers
            lg.setLevel(level)


def cmd_register(args: argparse.Namespace) -> None:
    from libdm.thin import registry

    reg = registry.Registration(
        pool_directory(args),
        threshold=args.threshold,
        percent=args.percent,
        **growth_options(args),
    )
    print(registry.register(reg, args.config_dir))


def cmd_unregister(args: argparse.Namespace) -> None:
    from libdm.thin import registry

    print(registry.unregister(pool_directory(args), args.config_dir))


def cmd_ls(args: argparse.Namespace) -> None:
    from libdm.thin import registry

    found = registry.read(args.config_dir)
    rows: list[_Registered] = []
    for path, reg in found.valid.items():
        state = registry.watch_state(reg.pool)
        rows.append(
            {
                "pool": reg.pool,
                "file": path,
                "threshold": reg.threshold,
                "percent": reg.percent,
                "watched": state is not None and state.watched,
                "invalid": None,
            }
        )
    for bad in found.invalid:
        rows.append(
            {
                "pool": None,
                "file": bad.path,
                "threshold": None,
                "percent": None,
                "watched": False,
                "invalid": bad.reason,
            }
        )
        print(f"libdm: {bad.reason}; the service skips it", file=sys.stderr)
    emit(
        args,
        rows,
        lambda: output.columns(
            (
                [
                    r["file"],
                    "-",
                    "-",
                    "invalid",
                ]
                if r["pool"] is None
                else [
                    r["pool"],
                    f"{r['threshold']}%",
                    f"{r['percent']}%",
                    "yes" if r["watched"] else "no",
                ]
                for r in rows
            ),
            ["POOL", "THRESHOLD", "GROW BY", "WATCHED"],
        ),
    )


def _config_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config-dir",
        metavar="DIR",
        default=None,
        help="the registrations (default $LIBDM_MONITOR_DIR or /etc/libdm/monitor.d)",
    )


def register(sub: Subparsers) -> None:
    p = command(
        sub,
        "serve",
        cmd_serve,
        path="monitor",
        help="watch every registered pool and grow them before they fill",
        description="Run the monitor service in the foreground until SIGTERM: every "
        "pool registered in the configuration directory gets an "
        "autoextend monitor; pools registered or removed meanwhile are "
        "picked up. Logs carry syslog priorities under systemd.",
        example="libdm monitor serve --config-dir /etc/libdm/monitor.d",
    )
    _config_dir(p)
    p.add_argument(
        "--rescan",
        metavar="SECONDS",
        type=positive_seconds,
        default=5.0,
        help="how often to look for new or removed registrations (default 5)",
    )
    p.add_argument(
        "--interval",
        metavar="SECONDS",
        type=positive_seconds,
        default=10.0,
        help="each monitor's status check when no event comes (default 10)",
    )

    p = command(
        sub,
        "register",
        cmd_register,
        pool=True,
        path="monitor",
        help="have the monitor service watch a pool (prints the file written)",
        example="libdm monitor register --pool /var/lib/images --threshold 80 --percent 20",
    )
    _config_dir(p)
    growth_arguments(p)

    p = command(
        sub,
        "unregister",
        cmd_unregister,
        pool=True,
        path="monitor",
        help="stop the monitor service watching a pool",
        example="libdm monitor unregister --pool /var/lib/images",
    )
    _config_dir(p)

    p = command(
        sub,
        "ls",
        cmd_ls,
        json=True,
        path="monitor",
        help="list the registered pools and whether the service watches them",
        example="libdm monitor ls",
    )
    _config_dir(p)
