"""Device commands, in the spirit of dmsetup: create, reload, suspend,
resume, remove, info, table, status, message, ls, version, targets.

Each one calls the device operation of the same name (``libdm.create``,
``libdm.table``...).  Tables are in 512-byte sectors, one target a line,
``<start> <length> <type> [params]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NotRequired, TypeAlias, TypedDict

import libdm
from libdm.cli import output
from libdm.cli.args import POOL_ENV, Subparsers, command, count
from libdm.cli.common import emit, wants_json

if TYPE_CHECKING:
    from libdm.cli.thin_cmds import PoolNote
    from libdm.dm.info import DeviceEntry, DeviceInfo
    from libdm.dm.target import Target

__all__ = ["DeviceNode", "dependency_forest", "info_pairs", "read_table", "register"]

#: A block device's (major, minor).
Devno: TypeAlias = tuple[int, int]


class DeviceNode(TypedDict):
    """A device in :func:`dependency_forest`, as ``libdm ls --tree --json``
    prints it."""

    name: str | None
    major: int
    minor: int
    dm: bool
    pool: NotRequired[PoolNote]
    deps: list[DeviceNode]


# -- tables --------------------------------------------------------------------


def _add_table_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--table",
        action="append",
        metavar="LINE",
        help="a table line '<start> <length> <type> [params]' (repeat it for several targets)",
    )
    group.add_argument(
        "--table-file",
        metavar="FILE",
        help="read the table from FILE ('-' for stdin), one target a line; "
        "blank lines and lines starting with # are skipped",
    )
    parser.add_argument("--readonly", action="store_true", help="load the table read-only")


def read_table(lines: Iterable[str]) -> list[Target]:
    """Parse table text into ``libdm.Target`` values with ``Target.parse``.

    Args:
        lines: table lines; a line may hold several, separated by newlines.
            Blank lines and ``#`` comments are skipped.

    Raises:
        ValueError: a line that does not parse, or no target at all.
    """
    targets: list[Target] = []
    for chunk in lines:
        for line in chunk.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                targets.append(libdm.Target.parse(line))
    if not targets:
        raise ValueError("the table is empty: give --table lines or a --table-file")
    return targets


def _table_of(args: argparse.Namespace) -> list[Target]:
    if args.table_file is None:
        return read_table(args.table)
    if args.table_file == "-":
        return read_table([sys.stdin.read()])
    with open(args.table_file, encoding="utf-8") as fh:
        return read_table([fh.read()])


def _targets_json(targets: Iterable[Target]) -> list[dict[str, object]]:
    return [t._asdict() for t in targets]


def _targets_text(targets: Iterable[Target]) -> str:
    return "".join(f"{t}\n" for t in targets)


# -- the commands ----------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> None:
    libdm.create(args.name, _table_of(args), uuid=args.uuid, read_only=args.readonly)
    print(libdm.device_path(args.name))


def cmd_reload(args: argparse.Namespace) -> None:
    libdm.reload(args.name, _table_of(args), read_only=args.readonly)


def cmd_suspend(args: argparse.Namespace) -> None:
    libdm.suspend(args.name, flush=not args.noflush, lockfs=not args.nolockfs)


def cmd_resume(args: argparse.Namespace) -> None:
    libdm.resume(args.name)


def cmd_remove(args: argparse.Namespace) -> None:
    libdm.remove(args.name, deferred=args.deferred, retries=args.retries)


def info_pairs(info: DeviceInfo) -> list[tuple[str, object]]:
    """``dmsetup info``-style (label, value) pairs of a ``DeviceInfo``."""
    state = "SUSPENDED" if info.suspended else "ACTIVE"
    if info.read_only:
        state += " (READ-ONLY)"
    tables = " & ".join(
        t
        for t, present in (("LIVE", info.live_table), ("INACTIVE", info.inactive_table))
        if present
    )
    items: list[tuple[str, object]] = [
        ("Name", info.name),
        ("State", state),
        ("Tables present", tables or "None"),
        ("Open count", info.open_count),
        ("Event number", info.event_nr),
        ("Major, minor", f"{info.major}, {info.minor}"),
        ("Number of targets", info.target_count),
    ]
    if info.uuid:
        items.append(("UUID", info.uuid))
    if info.deferred_remove:
        items.append(("Deferred remove", "pending"))
    items.append(("Path", libdm.device_path(info.name)))
    return items


def cmd_info(args: argparse.Namespace) -> None:
    info = libdm.info(args.name)
    data = dict(info._asdict(), devname=info.devname, path=libdm.device_path(info.name))
    emit(args, data, lambda: output.pairs(info_pairs(info)))


def cmd_table(args: argparse.Namespace) -> None:
    targets = libdm.table(args.name, inactive=args.inactive)
    emit(args, _targets_json(targets), lambda: _targets_text(targets))


def cmd_status(args: argparse.Namespace) -> None:
    targets = libdm.status(args.name)
    emit(args, _targets_json(targets), lambda: _targets_text(targets))


def cmd_message(args: argparse.Namespace) -> None:
    answer = libdm.message(args.name, " ".join(args.message), sector=args.sector)
    if answer:
        print(answer.rstrip("\n"))


# -- ls and its tree --------------------------------------------------------------


def _block_name(major: int, minor: int) -> str | None:
    """The kernel's name of a block device (``loop0``), or None."""
    try:
        with open(f"/sys/dev/block/{major}:{minor}/uevent", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("DEVNAME="):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None


def dependency_forest(
    entries: Sequence[DeviceEntry],
    deps_of: Callable[[str], Iterable[Devno]],
    pool_notes: dict[str, PoolNote] | None = None,
) -> list[DeviceNode]:
    """The device-mapper devices as a forest, ``dmsetup ls --tree`` style:
    each device with the devices it uses below it; the roots are the
    devices no other device uses.

    Args:
        entries: ``DeviceEntry`` values (``libdm.list_devices()``).
        deps_of: ``deps_of(name) -> [(major, minor), ...]`` (``libdm.deps``).
        pool_notes: ``{dm name: {...}}`` facts to attach to devices of a
            libdm pool (see :func:`libdm.cli.thin_cmds.pool_notes`).

    Returns:
        A list of nodes ``{"name", "major", "minor", "dm", "deps": [...]}``
        (plus ``"pool"`` facts where known); a device used by several
        others appears under each.
    """
    pool_notes = pool_notes or {}
    by_devno = {(e.major, e.minor): e for e in entries}
    uses = {e.name: [(major, minor) for major, minor in deps_of(e.name)] for e in entries}
    used = {devno for devnos in uses.values() for devno in devnos}

    def node(devno: Devno, path: frozenset[Devno]) -> DeviceNode:
        entry = by_devno.get(devno)
        if entry is None:
            return {
                "name": _block_name(*devno),
                "major": devno[0],
                "minor": devno[1],
                "dm": False,
                "deps": [],
            }
        deps = (
            []
            if devno in path
            else [node(d, path | {devno}) for d in sorted(uses.get(entry.name, ()))]
        )
        name, major, minor = entry.name, entry.major, entry.minor
        if name in pool_notes:
            # "pool" before "deps": the JSON keeps its order.
            note = pool_notes[name]
            return {
                "name": name,
                "major": major,
                "minor": minor,
                "dm": True,
                "pool": note,
                "deps": deps,
            }
        return {"name": name, "major": major, "minor": minor, "dm": True, "deps": deps}

    return [
        node((e.major, e.minor), frozenset()) for e in entries if (e.major, e.minor) not in used
    ]


def _note_text(note: PoolNote | None) -> str:
    if note is None:
        return ""
    return f"  [{note['summary']}]"


def _node_label(node: DeviceNode) -> str:
    devno = f"({node['major']}:{node['minor']})"
    name = node["name"]
    if not node["dm"]:
        return f"{name} {devno}" if name else devno
    return f"{name} {devno}{_note_text(node.get('pool'))}"


def _pool_notes(args: argparse.Namespace) -> dict[str, PoolNote]:
    directory: str | None = getattr(args, "pool", None) or os.environ.get(POOL_ENV)
    if not directory:
        return {}
    from libdm.cli.thin_cmds import pool_notes

    with libdm.Pool.load(directory) as pool:
        return pool_notes(pool)


def cmd_ls(args: argparse.Namespace) -> None:
    entries = libdm.list_devices()
    notes = _pool_notes(args)
    if args.tree:
        forest = dependency_forest(entries, libdm.deps, notes)
        emit(
            args,
            forest,
            lambda: output.tree(forest, _node_label, lambda n: n["deps"]) or "No devices found",
        )
        return
    data: list[dict[str, object]] = []
    for e in entries:
        item = e._asdict()
        if e.name in notes:
            item["pool"] = notes[e.name]
        data.append(item)
    if wants_json(args):
        emit(args, data, None)
        return
    rows = [
        [e.name, f"({e.major}:{e.minor})", _note_text(notes.get(e.name)).strip()] for e in entries
    ]
    emit(args, data, output.columns(rows) or "No devices found")


# -- versions -------------------------------------------------------------------


def cmd_version(args: argparse.Namespace) -> None:
    data = {
        "library": libdm.library_version(),
        "driver": ".".join(map(str, libdm.driver_version())),
        "libdm": libdm.__version__,
    }
    emit(
        args,
        data,
        lambda: output.pairs(
            [
                ("Library version", data["library"]),
                ("Driver version", data["driver"]),
                ("libdm version", data["libdm"]),
            ]
        ),
    )


def cmd_targets(args: argparse.Namespace) -> None:
    found = libdm.target_versions()
    data = [{"name": t.name, "version": ".".join(map(str, t.version))} for t in found]
    emit(args, data, lambda: output.columns([[d["name"], "v" + d["version"]] for d in data]))


# -- the parsers ------------------------------------------------------------------


def register(sub: Subparsers) -> None:
    p = command(
        sub,
        "create",
        cmd_create,
        help="create a device from a table, load it and resume it",
        description="Create a device, load its table and make it live. Prints the device's path.",
        example=[
            'libdm create zeros --table "0 2097152 zero"',
            "libdm create stack --table-file stack.table --uuid STACK-1",
        ],
    )
    p.add_argument("name", metavar="NAME", help="the device name")
    _add_table_args(p)
    p.add_argument("--uuid", metavar="UUID", help="give the device this uuid")

    p = command(
        sub,
        "reload",
        cmd_reload,
        help="load a new inactive table (live at the next resume)",
        example=['libdm reload zeros --table "0 4194304 zero"', "libdm resume zeros"],
    )
    p.add_argument("name", metavar="NAME", help="the device name")
    _add_table_args(p)

    p = command(
        sub,
        "suspend",
        cmd_suspend,
        help="suspend I/O on a device",
        example="libdm suspend --noflush images-pool",
    )
    p.add_argument("name", metavar="NAME", help="the device name")
    p.add_argument(
        "--noflush",
        action="store_true",
        help="keep queued I/O queued instead of flushing it (a full pool)",
    )
    p.add_argument(
        "--nolockfs", action="store_true", help="do not freeze a filesystem on the device first"
    )

    p = command(
        sub,
        "resume",
        cmd_resume,
        help="resume a device, making an inactive table live",
        example="libdm resume zeros",
    )
    p.add_argument("name", metavar="NAME", help="the device name")

    p = command(
        sub,
        "remove",
        cmd_remove,
        help="remove a device",
        example=["libdm remove zeros", "libdm remove --deferred busy-device"],
    )
    p.add_argument("name", metavar="NAME", help="the device name")
    p.add_argument(
        "--deferred", action="store_true", help="if busy, remove it when its last user closes it"
    )
    p.add_argument(
        "--retries",
        type=count,
        default=5,
        metavar="N",
        help="extra attempts while the device is busy (default 5)",
    )

    p = command(
        sub,
        "info",
        cmd_info,
        json=True,
        help="show a device's state",
        example=["libdm info zeros", "libdm info --json zeros"],
    )
    p.add_argument("name", metavar="NAME", help="the device name")

    p = command(
        sub,
        "table",
        cmd_table,
        json=True,
        help="show a device's table",
        example=["libdm table zeros", "libdm table --inactive zeros"],
    )
    p.add_argument("name", metavar="NAME", help="the device name")
    p.add_argument("--inactive", action="store_true", help="the loaded table that is not live yet")

    p = command(
        sub,
        "status",
        cmd_status,
        json=True,
        help="show the status of a device's targets",
        example="libdm status images",
    )
    p.add_argument("name", metavar="NAME", help="the device name")

    p = command(
        sub,
        "message",
        cmd_message,
        help="send a message to a device's target and print any answer",
        example="libdm message images 0 reserve_metadata_snap",
    )
    p.add_argument("name", metavar="NAME", help="the device name")
    p.add_argument(
        "sector",
        metavar="SECTOR",
        type=count,
        help="the sector whose target gets the message (usually 0)",
    )
    p.add_argument("message", metavar="MESSAGE", nargs="+", help="the message's words")

    p = command(
        sub,
        "ls",
        cmd_ls,
        json=True,
        pool=True,
        help="list devices, or draw what uses what with --tree",
        description="List the device-mapper devices. With --tree, each device is "
        "drawn with the devices it uses below it, as dmsetup ls --tree "
        "does. Given a pool (--pool DIR or $LIBDM_POOL), its devices "
        "are labelled with their pool name, thin id and snapshot "
        "lineage.",
        example=["libdm ls", "libdm ls --tree --pool /var/lib/images"],
    )
    p.add_argument("--tree", action="store_true", help="draw the dependency tree")

    command(
        sub,
        "version",
        cmd_version,
        json=True,
        help="show the libdevmapper, driver and libdm versions",
        example="libdm version --json",
    )

    command(
        sub,
        "targets",
        cmd_targets,
        json=True,
        help="list the target types the kernel has loaded",
        example="libdm targets",
    )
