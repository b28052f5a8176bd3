"""Thin commands: create, snapshot, delete, activate, deactivate and list
the thin devices of a pool (``libdm.Pool``'s device methods)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, NotRequired, TypedDict

from libdm.cli import output
from libdm.cli.args import Subparsers, command, size
from libdm.cli.common import emit, load_pool

if TYPE_CHECKING:
    from libdm.thin.pool import Pool

__all__ = [
    "DeviceRow",
    "LineageNode",
    "PoolNote",
    "device_rows",
    "lineage_forest",
    "pool_notes",
    "register",
]


class DeviceRow(TypedDict):
    """One thin device, as ``libdm thin ls --json`` prints it."""

    name: str
    thin_id: int
    size: int
    parent: str | None
    active: bool
    dm_name: str
    path: str


class LineageNode(DeviceRow):
    """A device in :func:`lineage_forest`, with the snapshots taken of it."""

    children: list[LineageNode]


class PoolNote(TypedDict):
    """What ``libdm ls`` says about a device-mapper device of a pool."""

    pool: str
    directory: str
    role: str
    summary: str
    device: NotRequired[str]
    thin_id: NotRequired[int]
    origin: NotRequired[str | None]
    lineage: NotRequired[list[str]]


def cmd_create(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        print(pool.create_thin(args.name, args.size).path)


def cmd_snapshot(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        print(pool.snapshot_device(args.origin, args.name).path)


def cmd_delete(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        pool.delete_device(args.name)


def cmd_resize(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        dev = pool.resize_device(
            args.name, args.size, force=args.force, grow_filesystem=args.grow_filesystem
        )
        print(f"{dev.name}: {output.size_text(dev.size)}")


def cmd_activate(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        pool.activate_device(args.name)
        print(pool.device(args.name).path)


def cmd_deactivate(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        pool.deactivate_device(args.name)


def device_rows(pool: Pool) -> list[DeviceRow]:
    """Every device of ``pool`` as a dict: name, thin_id, size (bytes),
    parent, active, dm_name and path."""
    devices = pool.devices()
    return [
        {
            "name": d.name,
            "thin_id": d.thin_id,
            "size": int(d.size),
            # As recorded with the device: the parent may be deleted
            # meanwhile by another process.
            "parent": d.parent_name,
            "active": d.active,
            "dm_name": d.dm_name,
            "path": d.path,
        }
        for d in devices
    ]


def lineage_forest(rows: list[DeviceRow]) -> list[LineageNode]:
    """The rows of :func:`device_rows` as a forest of snapshots: each
    device with ``"children"``, the snapshots taken of it."""
    nodes: dict[str, LineageNode] = {row["name"]: {**row, "children": []} for row in rows}
    roots: list[LineageNode] = []
    for row in rows:
        parent = nodes.get(row["parent"]) if row["parent"] is not None else None
        (parent["children"] if parent is not None else roots).append(nodes[row["name"]])
    return roots


def _lineage(row: DeviceRow, by_name: dict[str, DeviceRow]) -> list[str]:
    chain: list[str] = []
    seen = {row["name"]}
    parent = row["parent"]
    while parent is not None and parent not in seen:
        chain.append(parent)
        seen.add(parent)
        parent = by_name[parent]["parent"] if parent in by_name else None
    return chain


def pool_notes(pool: Pool) -> dict[str, PoolNote]:
    """Facts about the device-mapper devices that belong to ``pool``, by
    device-mapper name, for ``libdm ls``: the pool device, its split
    pieces, and each thin device with its thin id and snapshot lineage
    (``"lineage"``: its origin, the origin's origin, ...)."""
    notes: dict[str, PoolNote] = {
        pool.name: {
            "pool": pool.name,
            "directory": pool.directory,
            "role": "pool",
            "summary": f"libdm pool {pool.directory}",
        }
    }
    for piece, role in (("tmeta", "metadata"), ("tdata", "data")):
        notes[f"{pool.name}-{piece}"] = {
            "pool": pool.name,
            "directory": pool.directory,
            "role": role,
            "summary": f"{role} of pool {pool.name}",
        }
    rows = device_rows(pool)
    by_name = {row["name"]: row for row in rows}
    for row in rows:
        chain = _lineage(row, by_name)
        summary = f"{row['name']}, thin id {row['thin_id']}"
        if chain:
            summary += ", snapshot of " + " < ".join(chain)
        notes[row["dm_name"]] = {
            "pool": pool.name,
            "directory": pool.directory,
            "role": "snapshot" if chain else "thin",
            "device": row["name"],
            "thin_id": row["thin_id"],
            "origin": row["parent"],
            "lineage": chain,
            "summary": summary,
        }
    return notes


def _row_cells(row: DeviceRow) -> list[object]:
    return [
        row["name"],
        row["thin_id"],
        output.size_text(row["size"]),
        row["parent"] or "-",
        "yes" if row["active"] else "no",
        row["path"],
    ]


def _tree_label(node: LineageNode) -> str:
    state = "active" if node["active"] else "inactive"
    return f"{node['name']}  (id {node['thin_id']}, {output.size_text(node['size'])}, {state})"


def cmd_ls(args: argparse.Namespace) -> None:
    with load_pool(args, live=False) as pool:
        rows = device_rows(pool)
    if args.tree:
        forest = lineage_forest(rows)
        emit(args, forest, lambda: output.tree(forest, _tree_label, lambda n: n["children"]))
        return
    emit(
        args,
        rows,
        lambda: output.columns(
            map(_row_cells, rows), ["NAME", "ID", "SIZE", "PARENT", "ACTIVE", "PATH"], right=(1, 2)
        ),
    )


def register(sub: Subparsers) -> None:
    p = command(
        sub,
        "create",
        cmd_create,
        pool=True,
        path="thin",
        help="create a thin device and activate it (prints its path)",
        example="libdm thin create base 10G --pool /var/lib/images",
    )
    p.add_argument("name", metavar="NAME", help="its name within the pool")
    p.add_argument(
        "size",
        metavar="SIZE",
        type=size,
        nargs="?",
        help="its size, e.g. 10G (default: the pool's base size)",
    )

    p = command(
        sub,
        "snapshot",
        cmd_snapshot,
        pool=True,
        path="thin",
        help="snapshot a thin device and activate the snapshot (prints its path)",
        example="libdm thin snapshot base layer1 --pool /var/lib/images",
    )
    p.add_argument("origin", metavar="ORIGIN", help="the device to snapshot")
    p.add_argument("name", metavar="NAME", help="the snapshot's name")

    p = command(
        sub,
        "delete",
        cmd_delete,
        pool=True,
        path="thin",
        help="deactivate a thin device and delete it from the pool",
        example="libdm thin delete layer1 --pool /var/lib/images",
    )
    p.add_argument("name", metavar="NAME", help="the device (its snapshots keep their data)")

    p = command(
        sub,
        "resize",
        cmd_resize,
        pool=True,
        path="thin",
        help="grow (or with --force shrink) a thin device, online",
        description="Change a thin device's size online, as lvextend does for a "
        "thin volume.  Shrinking needs --force and a device nobody "
        "holds open; what lies past the new end is discarded.",
        example=[
            "libdm thin resize vol 20G --pool /var/lib/images",
            "libdm thin resize vol 20G --grow-filesystem",
        ],
    )
    p.add_argument("name", metavar="NAME", help="the device")
    p.add_argument("size", metavar="SIZE", type=size, help="its new size, e.g. 20G")
    p.add_argument(
        "--grow-filesystem",
        action="store_true",
        help="grow the ext4 or xfs filesystem on it too, mounted or not",
    )
    p.add_argument(
        "--force", action="store_true", help="allow shrinking (what lies past the new end is lost)"
    )

    p = command(
        sub,
        "activate",
        cmd_activate,
        pool=True,
        path="thin",
        help="make a thin device usable at its path (prints the path)",
        example="libdm thin activate base --pool /var/lib/images",
    )
    p.add_argument("name", metavar="NAME", help="the device")

    p = command(
        sub,
        "deactivate",
        cmd_deactivate,
        pool=True,
        path="thin",
        help="remove a thin device's device-mapper device, keeping its data",
        example="libdm thin deactivate base --pool /var/lib/images",
    )
    p.add_argument("name", metavar="NAME", help="the device")

    p = command(
        sub,
        "ls",
        cmd_ls,
        pool=True,
        json=True,
        path="thin",
        help="list the pool's thin devices, or their snapshot lineage with --tree",
        example=[
            "libdm thin ls --pool /var/lib/images",
            "LIBDM_POOL=/var/lib/images libdm thin ls --tree",
        ],
    )
    p.add_argument(
        "--tree", action="store_true", help="draw each snapshot below the device it was taken of"
    )
