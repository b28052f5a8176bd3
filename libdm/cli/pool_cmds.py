"""Pool commands: create, info, status, resize, extend, monitor, open,
destroy (``libdm.Pool``'s constructors and methods).

A pool is named by its state directory: ``--pool DIR``, or the
``LIBDM_POOL`` environment variable.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal, TypedDict

import libdm
from libdm._signals import stop_on_signals
from libdm.cli import output
from libdm.cli.args import (
    GrowthOptions,
    Subparsers,
    UsageError,
    command,
    count,
    deferred_arguments,
    growth_arguments,
    growth_options,
    min_free_space_argument,
    percentage,
    positive_seconds,
    size,
)
from libdm.cli.common import emit, error_text, load_pool, pool_directory

if TYPE_CHECKING:
    from libdm.dm.errors import DeviceBusyError
    from libdm.thin.pool import Pool
    from libdm.thin.report import PoolInfo
    from libdm.thin.status import ThinPoolFailed, ThinPoolStatus
    from libdm.thin.units import Bytes

__all__ = [
    "FailedStatusJson",
    "GrowthOptions",
    "StatusJson",
    "info_json",
    "register",
    "status_json",
    "status_pairs",
]

logger = logging.getLogger("libdm.monitor")


# -- create and open ---------------------------------------------------------------


def _refuse(args: argparse.Namespace, mode: str, *names: str) -> None:
    given = [
        n for n in names if getattr(args, n.lstrip("-").replace("-", "_")) not in (None, False)
    ]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be used with {mode}", "libdm pool create")


def _require(args: argparse.Namespace, mode: str, *names: str) -> None:
    for n in names:
        if getattr(args, n.lstrip("-").replace("-", "_")) is None:
            raise UsageError(f"{mode} needs {n}", "libdm pool create")


class _CreateOptions(TypedDict):
    """The options every ``Pool.create*`` takes from ``pool create``."""

    block_size: int  # bytes
    min_free_space: int
    features: list[str]
    deferred_removal: bool
    deferred_deletion: bool


def cmd_create(args: argparse.Namespace) -> None:
    _create(args)


def _create(args: argparse.Namespace) -> None:
    options: _CreateOptions = {
        "block_size": int(args.block_size),
        "min_free_space": args.min_free_space,
        "features": args.feature,
        "deferred_removal": not args.no_deferred_removal,
        "deferred_deletion": not args.no_deferred_deletion,
    }
    if args.loop is not None:
        _refuse(
            args,
            "--loop",
            "--metadata",
            "--state-dir",
            "--thinp-percent",
            "--thinp-metapercent",
            "--force",
        )
        _require(args, "--loop", "--data-size")
        pool: Pool = libdm.Pool.create_loop(
            args.name,
            args.loop,
            data_size=args.data_size,
            metadata_size=args.metadata_size,
            **options,
        )
    elif args.device is not None:
        _refuse(args, "--device", "--metadata", "--data-size", "--metadata-size")
        _require(args, "--device", "--state-dir")
        pool = libdm.Pool.create_on_device(
            args.name,
            args.device,
            95 if args.thinp_percent is None else args.thinp_percent,
            1 if args.thinp_metapercent is None else args.thinp_metapercent,
            args.force,
            state_dir=args.state_dir,
            **options,
        )
    else:
        _refuse(
            args,
            "--data",
            "--data-size",
            "--metadata-size",
            "--thinp-percent",
            "--thinp-metapercent",
        )
        _require(args, "--data", "--metadata", "--state-dir")
        pool = libdm.Pool.create(
            args.name,
            args.data,
            args.metadata,
            state_dir=args.state_dir,
            force=args.force,
            **options,
        )
    with pool:
        if args.for_docker:
            pool.hand_over("docker")
        print(pool.path)


def _counter(what: str) -> Callable[[int, int], None] | None:
    """``progress(done, total)`` drawing ``what: done/total`` on a terminal
    (stderr), or ``None`` when stderr is not one."""
    if not sys.stderr.isatty():
        return None
    step = {"last": 0.0}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - step["last"] >= 0.1:
            step["last"] = now
            end = "\n" if done == total else ""
            print(f"\r{what}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return progress


def cmd_open(args: argparse.Namespace) -> int:
    directory: str = args.directory or pool_directory(args)
    with libdm.Pool.open(
        directory, progress=_counter("activating devices"), lazy=args.lazy
    ) as pool:
        if pool.handed_to is not None:
            print(
                f"pool {pool.name} is active at {pool.path}; "
                f"its thin devices are {pool.handed_to}'s"
            )
            return 0
        devices = pool.devices()
        active = sum(d.active for d in devices)
        print(
            f"pool {pool.name} is active at {pool.path}: {len(devices)} devices, {active} active"
        )
        for name, why in sorted(pool.unavailable.items()):
            if isinstance(why, libdm.ForeignDeviceError):
                # Only its name is in the way: the device and its data are fine.
                remedy = (
                    f"; once its name is free, activate it with: "
                    f"libdm thin activate {name} --pool {directory}"
                )
            elif isinstance(why, libdm.ChangedByAnotherError):
                remedy = ""  # its data is fine; the message says what is in the way
            else:
                remedy = f"; delete it with: libdm thin delete {name} --pool {directory}"
            print(
                f"libdm: device {name} could not be activated: {error_text(why)}{remedy}",
                file=sys.stderr,
            )
    return 1 if pool.unavailable else 0


def cmd_adopt(args: argparse.Namespace) -> None:
    pool: Pool = libdm.Pool.adopt(
        args.pool_device,
        state_dir=args.state_dir,
        min_free_space=args.min_free_space,
        deferred_removal=not args.no_deferred_removal,
        deferred_deletion=not args.no_deferred_deletion,
    )
    with pool:
        print(pool.path)


def cmd_hand_over(args: argparse.Namespace) -> None:
    with load_pool(args, live=False) as pool:
        pool.hand_over(args.to)
        print(f"pool {pool.name}: thin devices handed to {args.to}; libdm keeps the pool")


def cmd_destroy(args: argparse.Namespace) -> None:
    from libdm.dm.errors import DeviceBusyError

    pool = load_pool(args, live=False)
    try:
        pool.destroy(remove_files=args.remove_files, force=args.force)
    except DeviceBusyError as exc:
        pool.close()
        raise _busy_in_destroy(exc) from None
    except BaseException:
        pool.close()
        raise


def _busy_in_destroy(exc: DeviceBusyError) -> DeviceBusyError:
    """The busy error of a destroy, naming the device and where it is
    mounted, with what to do at the command line."""
    from libdm.dm.errors import DeviceBusyError

    if exc.device is None:
        return exc
    from libdm.dm import ops
    from libdm.thin import fs

    path = ops.device_path(exc.device)
    where = fs.mounts_of(path)
    if where:
        held = f"it is mounted on {', '.join(where)}: unmount it there"
    elif ops.has_node(exc.device):
        held = (
            f"something holds it open (a process or another device: see fuser -vm {path} "
            f"and dmsetup info {exc.device}): stop it"
        )
    else:
        # A deactivation deferred to its last user drops the node first.
        held = (
            f"it was deactivated and waits for whatever still holds it open (a process or "
            f"another device: see dmsetup info {exc.device} for its open count, and "
            f"lsof or the holders in sysfs for the process): stop it"
        )
    return DeviceBusyError(
        exc.errno,
        f"the device {exc.device} is busy, so the pool is not destroyed; {held}, then run "
        f"libdm pool destroy again",
        "destroy",
        exc.device,
        exc.log_lines,
    )


# -- reading --------------------------------------------------------------------------


def info_json(report: PoolInfo) -> dict[str, object]:
    """``PoolInfo.as_dict()`` plus the raw numbers: sizes in bytes under
    ``"bytes"``, and the transaction id, device count and state."""
    data: dict[str, object] = dict(report.as_dict())
    data["bytes"] = {
        "pool_blocksize": int(report.pool_blocksize),
        "base_device_size": (
            None if report.base_device_size is None else int(report.base_device_size)
        ),
        "data_used": int(report.data_used),
        "data_total": int(report.data_total),
        "data_available": int(report.data_available),
        "metadata_used": int(report.metadata_used),
        "metadata_total": int(report.metadata_total),
        "metadata_available": int(report.metadata_available),
        "min_free_space": int(report.min_free_space),
    }
    data["transaction_id"] = report.transaction_id
    data["devices"] = report.devices
    data["state"] = report.state
    return data


def cmd_info(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        report = pool.info()
    emit(args, info_json(report), lambda: str(report))


class FailedStatusJson(TypedDict):
    """:func:`status_json` of a failed pool."""

    failed: Literal[True]
    state: str
    line: str


class StatusJson(TypedDict):
    """:func:`status_json` of a working pool (``libdm pool status --json``)."""

    failed: Literal[False]
    transaction_id: int
    used_data_blocks: int
    total_data_blocks: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    data_block_size: int
    used_data_bytes: int
    total_data_bytes: int
    used_metadata_bytes: int
    total_metadata_bytes: int
    held_root: int | None
    mode: str
    discard: str
    no_space: str
    needs_check: bool
    metadata_low_water_blocks: int | None
    line: str


def status_json(
    st: ThinPoolStatus | ThinPoolFailed, block_size: Bytes, *, suspended: bool = False
) -> StatusJson | FailedStatusJson:
    """A pool status as JSON-ready values: the kernel's fields, the same
    sizes in bytes, and the kernel's ``line`` as it printed it.  The mode
    of a ``suspended`` pool is ``"suspended"``: its status line still says
    rw, but no I/O gets through."""
    from libdm.thin.status import ThinPoolFailed

    if isinstance(st, ThinPoolFailed):
        return {"failed": True, "state": st.state, "line": str(st)}
    block = int(block_size)
    return {
        "failed": False,
        "transaction_id": st.transaction_id,
        "used_data_blocks": int(st.used_data),
        "total_data_blocks": int(st.total_data),
        "used_metadata_blocks": int(st.used_meta),
        "total_metadata_blocks": int(st.total_meta),
        "data_block_size": block,
        "used_data_bytes": int(st.used_data) * block,
        "total_data_bytes": int(st.total_data) * block,
        "used_metadata_bytes": int(st.used_meta.bytes()),
        "total_metadata_bytes": int(st.total_meta.bytes()),
        "held_root": st.held_root,
        "mode": "suspended" if suspended else st.mode,
        "discard": st.discard,
        "no_space": st.no_space,
        "needs_check": st.needs_check,
        "metadata_low_water_blocks": (
            None if st.meta_low_water is None else int(st.meta_low_water)
        ),
        "line": str(st),
    }


def status_pairs(data: StatusJson | FailedStatusJson) -> list[tuple[str, object]]:
    """(label, value) lines of :func:`status_json`'s result, for people."""
    if data["failed"]:
        return [
            (
                "State",
                f"{data['state']} (the pool has failed: check and repair its "
                f"metadata with thin_check and thin_repair)",
            )
        ]

    def usage(used: int, total: int, used_blocks: int, total_blocks: int, unit: str) -> str:
        return (
            f"{output.size_text(used)} of {output.size_text(total)} used "
            f"({output.percent(used, total)}); {used_blocks} of {total_blocks} {unit}"
        )

    data_unit = f"blocks of {output.size_text(data['data_block_size'])}"
    return [
        ("Transaction id", data["transaction_id"]),
        (
            "Data",
            usage(
                data["used_data_bytes"],
                data["total_data_bytes"],
                data["used_data_blocks"],
                data["total_data_blocks"],
                data_unit,
            ),
        ),
        (
            "Metadata",
            usage(
                data["used_metadata_bytes"],
                data["total_metadata_bytes"],
                data["used_metadata_blocks"],
                data["total_metadata_blocks"],
                "blocks of 4 KiB",
            ),
        ),
        ("Mode", data["mode"]),
        ("Discards", data["discard"]),
        ("When full", data["no_space"]),
        ("Needs check", "yes" if data["needs_check"] else "no"),
        ("Held metadata root", "-" if data["held_root"] is None else data["held_root"]),
    ]


def cmd_status(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        suspended = pool.suspended
        data = status_json(pool.status(), pool.block_size.bytes(), suspended=suspended)
        directory = pool.directory

    def text() -> str:
        pairs = status_pairs(data)
        if suspended:
            # Say what resumes it.
            why = (
                f"suspended (no I/O gets through; a growth a crash interrupted is "
                f"finished, and the pool resumed, by its next change or by libdm pool "
                f"open {directory})"
            )
            pairs = [(label, why if label == "Mode" else value) for label, value in pairs]
        return output.pairs(pairs)

    emit(args, data, text)


# -- growing ------------------------------------------------------------------------


def _sizes_line(pool: Pool) -> str:
    from libdm.thin.status import ThinPoolFailed

    st = pool.status()
    meta = "?" if isinstance(st, ThinPoolFailed) else output.size_text(st.total_meta.bytes())
    return f"pool {pool.name}: data {output.size_text(pool.data_size())}, metadata {meta}"


def cmd_resize(args: argparse.Namespace) -> None:
    if args.size is None and args.metadata_size is None:
        raise UsageError("give the new data SIZE, --metadata-size, or both", "libdm pool resize")
    with load_pool(args) as pool:
        # Metadata first, as Pool.resize does, each step shown on a terminal.
        if args.metadata_size is not None:
            with _step(f"growing the metadata of pool {pool.name}"):
                pool.resize(metadata_size=args.metadata_size)
        if args.size is not None:
            with _step(f"growing the data of pool {pool.name}"):
                pool.resize(data_size=args.size)
        print(_sizes_line(pool))


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """On a terminal (stderr), ``what...`` and then how long it took: the
    kernel's work on a big pool can take a while, with nothing to count."""
    if not sys.stderr.isatty():
        yield
        return
    print(f"{what}...", end="", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" done in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def cmd_extend(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        with _step(f"extending pool {pool.name} onto {args.device}"):
            pool.extend(
                args.device,
                metadata=args.metadata,
                force=args.force,
                start=args.start,
                length=args.length,
            )
        print(_sizes_line(pool))


def cmd_repair(args: argparse.Namespace) -> int:
    with load_pool(args, live=False) as pool:
        result = pool.repair(partial=args.partial, spare=args.spare, force=args.force)
        if result.lost:
            # Swapped in because --partial said so; still not a success.
            print(f"pool {pool.name}: the repaired metadata is in place, with losses:")
            for device in result.lost:
                print(f"  {device.describe()}")
        else:
            print(f"pool {pool.name}: metadata repaired; the damaged copy is {result.damaged}")
        for device in result.unverified:
            print(
                f"  not verified: {device.describe()} (what it mapped before cannot be read "
                f"from the damaged copy: check its contents)"
            )
        if result.lost:
            print(f"the damaged copy is {result.damaged}")
            return 1
        return 0


def cmd_trim(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        print(f"pool {pool.name}: {output.size_text(pool.trim())} trimmed")


def cmd_set(args: argparse.Namespace) -> None:
    settings = {
        key: getattr(args, key)
        for key in (
            "base_size",
            "discard_on_delete",
            "deferred_removal",
            "deferred_deletion",
            "xfs_nospace_max_retries",
        )
    }
    settings = {
        key: value if not isinstance(value, str) else value == "on"
        for key, value in settings.items()
        if value is not None
    }
    if not settings:
        raise UsageError(
            "give at least one setting (--base-size, --discard-on-delete, "
            "--deferred-removal, --deferred-deletion, "
            "--xfs-nospace-max-retries)",
            "libdm pool set",
        )
    with load_pool(args) as pool:
        pool.configure(**settings)


def cmd_refresh(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        pool.refresh()
        print(_sizes_line(pool))


def cmd_monitor(args: argparse.Namespace) -> None:
    with load_pool(args) as pool:
        monitor = pool.monitor(
            args.threshold, args.percent, **growth_options(args), interval=args.interval
        )
        with stop_on_signals(monitor.stop, log=logger):
            logger.info(
                "pool %s: watching (grow by %d%% at %d%% used, checking every %g s)",
                pool.name,
                args.percent,
                args.threshold,
                args.interval,
            )
            history = monitor.run(iterations=args.iterations)
        grown = sum(step.ok for step in history)
        logger.info(
            "pool %s: stopped; %d growth steps, %d failed", pool.name, grown, len(history) - grown
        )


# -- the parsers ----------------------------------------------------------------------


def register(sub: Subparsers) -> None:
    p = command(
        sub,
        "create",
        cmd_create,
        path="pool",
        help="create a pool on loop files, one device, or two devices",
        description="Create a thin pool and activate it; prints the pool device's "
        "path. Three kinds: sparse loop files in a directory (--loop, "
        "for testing), one raw block device split into metadata and "
        "data (--device), or a data and a metadata device (--data and "
        "--metadata). A device that carries a filesystem or another "
        "signature is refused without --force.",
        example=[
            "libdm pool create images --loop /var/lib/images --data-size 100G",
            "libdm pool create images --device /dev/xvdf --state-dir /var/lib/libdm/images",
            "libdm pool create images --data /dev/sdb1 --metadata /dev/sdc1 "
            "--state-dir /var/lib/libdm/images",
        ],
    )
    p.add_argument("name", metavar="NAME", help="the pool's device-mapper name")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--loop", metavar="DIR", help="sparse data and metadata files in DIR, the state directory"
    )
    mode.add_argument("--device", metavar="DEV", help="one block device to split")
    mode.add_argument("--data", metavar="DEV", help="the data block device")
    p.add_argument("--metadata", metavar="DEV", help="the metadata block device (with --data)")
    p.add_argument(
        "--state-dir", metavar="DIR", help="the state directory (with --device or --data)"
    )
    p.add_argument(
        "--data-size", metavar="SIZE", type=size, help="size of the data file (with --loop)"
    )
    p.add_argument(
        "--metadata-size",
        metavar="SIZE",
        type=size,
        help="size of the metadata file (with --loop; default 48 bytes per "
        "data block, at least 2M)",
    )
    p.add_argument(
        "--thinp-percent",
        metavar="PCT",
        type=percentage,
        help="percent of the device for data (with --device; default 95)",
    )
    p.add_argument(
        "--thinp-metapercent",
        metavar="PCT",
        type=percentage,
        help="percent of the device for metadata (with --device; default 1)",
    )
    p.add_argument(
        "--block-size",
        metavar="SIZE",
        type=size,
        default="64K",
        help="data block size, 64K to 1G in steps of 64K (default 64K)",
    )
    min_free_space_argument(p)
    deferred_arguments(p)
    p.add_argument(
        "--feature",
        metavar="F",
        action="append",
        default=[],
        help="a thin-pool feature: skip_block_zeroing, ignore_discard, "
        "no_discard_passdown, read_only or error_if_no_space (repeatable)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="use block devices that carry a signature (their data is lost)",
    )
    p.add_argument(
        "--for-docker",
        action="store_true",
        help="hand the pool's thin devices to Docker's devicemapper driver "
        "(dm.thinpooldev); libdm keeps managing the pool (see 'pool hand-over')",
    )

    p = command(
        sub,
        "hand-over",
        cmd_hand_over,
        pool=True,
        path="pool",
        help="hand the pool's thin devices to another program (Docker's driver)",
        description="Hand the thin devices of a pool without libdm devices to "
        "another program, such as Docker's devicemapper driver "
        "(--storage-opt dm.thinpooldev=/dev/mapper/NAME). libdm keeps the "
        "pool: 'pool open' brings it up after a reboot without touching "
        "a thin device or the transaction id, and it grows (resize, extend, "
        "the monitor service) and reports as before; thin commands are "
        "refused.",
        example="libdm pool hand-over --to docker --pool /var/lib/images",
    )
    p.add_argument(
        "--to",
        metavar="PROGRAM",
        default="docker",
        help="the program that now owns the thin devices (default docker)",
    )

    command(
        sub,
        "info",
        cmd_info,
        pool=True,
        json=True,
        path="pool",
        help="show the pool report (docker info's devicemapper fields)",
        example=[
            "libdm pool info --pool /var/lib/images",
            "libdm pool info --json --pool /var/lib/images",
        ],
    )

    command(
        sub,
        "status",
        cmd_status,
        pool=True,
        json=True,
        path="pool",
        help="show the kernel's status of the pool: usage, mode, needs_check",
        example="libdm pool status --pool /var/lib/images",
    )

    p = command(
        sub,
        "resize",
        cmd_resize,
        pool=True,
        path="pool",
        help="grow a loop pool's data and/or metadata files online",
        description="Grow a loop pool's data file to SIZE and/or its metadata "
        "file to --metadata-size, online (like device_tool resize). "
        "Pools never shrink.",
        example=[
            "libdm pool resize 200G --pool /var/lib/images",
            "libdm pool resize --metadata-size 1G --pool /var/lib/images",
        ],
    )
    p.add_argument("size", metavar="SIZE", type=size, nargs="?", help="the new data size")
    p.add_argument("--metadata-size", metavar="SIZE", type=size, help="the new metadata size")

    p = command(
        sub,
        "extend",
        cmd_extend,
        pool=True,
        path="pool",
        help="grow a block pool's data onto another block device",
        description="Add a block device to a block pool's data, online (as "
        "vgextend and lvextend did for LVM pools).",
        example="libdm pool extend /dev/xvdg --pool /var/lib/libdm/images",
    )
    p.add_argument("device", metavar="DEV", help="the block device to add")
    p.add_argument("--metadata", action="store_true", help="grow the metadata instead of the data")
    p.add_argument(
        "--start",
        metavar="SIZE",
        type=size,
        help="use a region of DEV starting here (default: its start)",
    )
    p.add_argument(
        "--length",
        metavar="SIZE",
        type=size,
        help="the region's length (default: to the end of DEV)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="use a device that carries a signature (its data is lost)",
    )

    p = command(
        sub,
        "repair",
        cmd_repair,
        pool=True,
        path="pool",
        help="repair a pool's metadata with thin_repair (lvconvert --repair)",
        description="Take the pool down (none of its devices may be open), "
        "repair its metadata into a spare with thin_repair, check it "
        "with thin_check, and compare what each device maps before and "
        "after. If nothing was lost, swap it in keeping the damaged copy "
        "and bring the pool and its active devices back; otherwise name "
        "each device and what it lost, keep both copies, and exit 1.",
        example="libdm pool repair --pool /var/lib/images",
    )
    p.add_argument(
        "--partial",
        action="store_true",
        help="swap in a repaired copy that lost mappings or devices (then still exit 1), "
        "or whose devices cannot be verified",
    )
    p.add_argument(
        "--spare",
        metavar="DEV",
        help="a block pool's device to repair into, when it has no free region for it",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="use a --spare device that carries a signature (its data is lost)",
    )

    command(
        sub,
        "trim",
        cmd_trim,
        pool=True,
        path="pool",
        help="give back what the filesystems on the pool's devices freed (fstrim)",
        example="libdm pool trim --pool /var/lib/images",
    )

    p = command(
        sub,
        "set",
        cmd_set,
        pool=True,
        path="pool",
        help="change the pool's settings: base size, discard on delete, deferred "
        "removal and deletion",
        example=[
            "libdm pool set --base-size 20G --pool /var/lib/images",
            "libdm pool set --discard-on-delete on",
        ],
    )
    p.add_argument(
        "--base-size",
        metavar="SIZE",
        type=size,
        help="the size of devices created without one (dm.basesize)",
    )
    p.add_argument(
        "--discard-on-delete",
        choices=("on", "off"),
        help="discard a device's blocks before deleting it (dm.blkdiscard)",
    )
    p.add_argument(
        "--deferred-removal",
        choices=("on", "off"),
        help="remove a busy device when its last user closes it",
    )
    p.add_argument(
        "--deferred-deletion",
        choices=("on", "off"),
        help="queue a delete that meets a busy device, and retry it later",
    )
    p.add_argument(
        "--xfs-nospace-max-retries",
        metavar="N",
        type=int,
        help="how often xfs retries a metadata write at ENOSPC (-1: forever)",
    )

    command(
        sub,
        "refresh",
        cmd_refresh,
        pool=True,
        path="pool",
        help="reload the pool to use devices that grew outside libdm",
        description="Reload a block pool so it uses all of its devices' current "
        "size, after they were grown by other means (an LVM volume "
        "extended, a cloud disk resized).",
        example="libdm pool refresh --pool /var/lib/libdm/images",
    )

    p = command(
        sub,
        "monitor",
        cmd_monitor,
        pool=True,
        path="pool",
        help="watch the pool and grow it before it fills (runs in the foreground)",
        description="Watch the pool and grow its data or metadata by --percent "
        "when its use reaches --threshold: loop pools by growing "
        "their files, block pools onto the --spare devices. Runs in "
        "the foreground, logging each step on stderr, until SIGTERM "
        "or SIGINT (which stop it once the current wait ends, at most "
        "--interval seconds later).",
        example="libdm pool monitor --threshold 80 --percent 20 --pool /var/lib/images",
    )
    growth_arguments(p)
    p.add_argument(
        "--interval",
        metavar="SECONDS",
        type=positive_seconds,
        default=10.0,
        help="seconds between checks when no event comes (default 10)",
    )
    p.add_argument(
        "--iterations",
        metavar="N",
        type=count,
        help="stop after N wake-ups (default: run until stopped)",
    )

    p = command(
        sub,
        "open",
        cmd_open,
        pool=True,  # --pool DIR, as the other pool commands take it
        path="pool",
        help="activate a pool from its state directory (after a reboot)",
        description="Activate a pool from its state directory after a reboot: "
        "re-attach its files, load its table, settle any change a "
        "crash interrupted and re-activate its active devices. On a "
        "live pool, check it against its stored state.",
        example="libdm pool open /var/lib/images",
    )
    p.add_argument(
        "directory",
        metavar="DIR",
        nargs="?",
        help="the pool's state directory (default --pool, then $LIBDM_POOL)",
    )
    p.add_argument(
        "--lazy",
        action="store_true",
        help="leave the devices that were active down until first used "
        "(thin activate brings one up), as Docker's driver does",
    )

    p = command(
        sub,
        "adopt",
        cmd_adopt,
        path="pool",
        help="take over an existing, unused thin-pool device (dm.thinpooldev)",
        description="Keep libdm's state for an existing thin-pool device that "
        "someone else made (an LVM thin pool, say); it must be "
        "unused. libdm never removes its devices.",
        example="libdm pool adopt vg-thinpool-tpool --state-dir /var/lib/libdm/pool",
    )
    p.add_argument(
        "pool_device", metavar="POOLDEV", help="the thin-pool device-mapper device's name"
    )
    p.add_argument(
        "--state-dir", metavar="DIR", required=True, help="where to keep libdm's state for it"
    )
    min_free_space_argument(p)
    deferred_arguments(p)

    p = command(
        sub,
        "destroy",
        cmd_destroy,
        pool=True,
        path="pool",
        help="remove the pool's devices and the pool",
        description="Remove every thin device, the pool device and what backs "
        "it. Without --remove-files the pool can be brought back with "
        "'libdm pool open'.",
        example="libdm pool destroy --remove-files --pool /var/lib/images",
    )
    p.add_argument(
        "--remove-files",
        action="store_true",
        help="also delete a loop pool's files and the state store",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="remove the files of a pool handed to another program (its devices are lost)",
    )
