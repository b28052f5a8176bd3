"""Proving that a device-mapper device is the one a pool made.

A name is not an identity: a pool's device ``x`` is the device-mapper
device ``<pool>-x``, so pool ``a``'s device ``b-x`` and pool ``a-b``'s
device ``x`` share a name, and any program may ``dmsetup create`` a
device called like one of ours.  What libdm can prove is what it set: the
uuid it gives each device when it creates it (``LIBDM-THIN-<token>-<id>``
for a thin device, the pool's own uuid for the pool device,
``LIBDM-PIECE-<token>-tdata`` / ``-tmeta`` for a block pool's linear
pieces) and, for a thin device, a table that maps this pool's thin id;
for a piece, a linear table.

Every operation on a device asks here first: :func:`live_thin`,
:func:`live_pool` and :func:`live_piece` return the live device once proven, ``None`` when no
device has the name, and otherwise raise
:class:`~libdm.thin.errors.ForeignDeviceError` naming the device and,
where it can be told, its owner.  Nothing here changes a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from libdm.dm import ops
from libdm.dm.errors import NoSuchDeviceError
from libdm.dm.info import DeviceInfo
from libdm.dm.target import Target
from libdm.thin.errors import ForeignDeviceError
from libdm.thin.table import ThinParams

__all__ = [
    "PIECE_UUID_PREFIX",
    "POOL_UUID_PREFIX",
    "THIN_UUID_PREFIX",
    "Live",
    "ThinClaim",
    "libdm_pool_named",
    "live_piece",
    "live_pool",
    "live_thin",
    "piece_uuid",
    "thin_uuid",
]

#: The uuids libdm gives the devices it makes.
THIN_UUID_PREFIX = "LIBDM-THIN-"
POOL_UUID_PREFIX = "LIBDM-POOL-"
PIECE_UUID_PREFIX = "LIBDM-PIECE-"


def thin_uuid(token: str, thin_id: int) -> str:
    """The uuid of thin id ``thin_id``'s device in the pool whose
    configuration holds ``token``."""
    return f"{THIN_UUID_PREFIX}{token}-{thin_id}"


def piece_uuid(token: str, piece: str) -> str:
    """The uuid of a block pool's linear piece ``piece`` (``"tmeta"`` or
    ``"tdata"``) in the pool whose configuration holds ``token``."""
    return f"{PIECE_UUID_PREFIX}{token}-{piece}"


@dataclass(frozen=True)
class ThinClaim:
    """What a pool knows of one of its thin devices, to recognise it.

    Attributes:
        pool: the pool's device-mapper name.
        name: the device's name within the pool.
        dm_name: its device-mapper name.
        uuid: the uuid libdm gives it.
        thin_id: its thin id.
        pool_devno: the live pool device's ``major:minor``, or ``None``
            when the pool is not live (then no thin device of it can be).
    """

    pool: str
    name: str
    dm_name: str
    uuid: str
    thin_id: int
    pool_devno: str | None


class Live(NamedTuple):
    """A live device as it was proven: its info and live table (empty when
    it has none)."""

    info: DeviceInfo
    table: list[Target]


def _look(name: str) -> Live | None:
    """The device's info and live table, or ``None`` if there is none.
    The info ioctl answers a missing device without an error (nothing is
    logged); the table is read only from a device that exists."""
    try:
        info = ops.info(name)
        return Live(info, ops.table(name) if info.live_table else [])
    except NoSuchDeviceError:
        return None  # gone meanwhile


def live_thin(claim: ThinClaim, operation: str) -> Live | None:
    """The live device called ``claim.dm_name``, if it is the pool's own:
    its uuid is the claim's and its table is (or will be, for one a
    killed create left without a table) one ``thin`` target on this pool
    with this thin id; its length may differ (a resize a kill
    interrupted, which activation corrects).

    Returns:
        Its info and table, or ``None`` when no device has that name.

    Raises:
        ForeignDeviceError: a device of that name that the pool did not
            make, or whose table someone else changed.
    """
    seen = _look(claim.dm_name)
    if seen is None:
        return None
    info, table = seen
    if (info.uuid or "") == claim.uuid:
        if not table:
            return seen
        params = _thin_params(table)
        if (
            params is not None
            and claim.pool_devno is not None
            and params.pool_dev == claim.pool_devno
            and params.thin_id == claim.thin_id
        ):
            return seen
        expected = (
            f"a thin target of thin id {claim.thin_id} on the pool"
            if claim.pool_devno is None
            else f"thin {claim.pool_devno} {claim.thin_id}"
        )
        owner = (
            f"a device with this pool's uuid {claim.uuid!r} whose table was changed "
            f"outside libdm ({_shown(table)}, expected {expected})"
        )
    else:
        owner = _owner(info, table)
    raise ForeignDeviceError(
        f"device-mapper device {claim.dm_name!r} is not device {claim.name!r} of pool "
        f"{claim.pool!r}: it is {owner}; libdm leaves it alone",
        operation,
        claim.dm_name,
    )


def live_pool(name: str, uuid: str, directory: str, operation: str) -> Live | None:
    """The live device called ``name``, if it is the pool device of the
    pool whose state is in ``directory`` (its uuid is ``uuid``; an adopted
    pool's may be empty).

    Returns:
        Its info and table, or ``None`` when no device has that name.

    Raises:
        ForeignDeviceError: a device of that name with another uuid.
    """
    seen = _look(name)
    if seen is None:
        return None
    info, table = seen
    if (info.uuid or "") == (uuid or ""):
        return seen
    raise ForeignDeviceError(
        f"device-mapper device {name!r} is not the pool device of the pool in "
        f"{directory} (uuid {uuid!r}): it is {_owner(info, table)}; libdm leaves it alone",
        operation,
        name,
    )


def live_piece(
    name: str,
    uuid: str,
    pool: str,
    operation: str,
    *,
    devices: frozenset[str] | None = None,
    unmarked: Sequence[Target] | None = None,
) -> Live | None:
    """The live device called ``name``, if it is the linear piece of pool
    ``pool`` whose uuid is ``uuid``: that uuid, and a table (if it has one)
    of linear targets over ``devices`` (``major:minor`` values; ``None``:
    any device).

    A piece made before pieces had uuids has none: one with no uuid whose
    table is exactly ``unmarked`` (what the pool's record maps) is taken
    as the pool's, and the caller gives it its uuid.

    Returns:
        Its info and table, or ``None`` when no device has that name.

    Raises:
        ForeignDeviceError: a device of that name the pool did not make.
    """
    seen = _look(name)
    if seen is None:
        return None
    info, table = seen
    found = info.uuid or ""
    if found == uuid:
        over = {t.params.split()[0] for t in table if t.type == "linear" and t.params}
        if all(t.type == "linear" for t in table) and (devices is None or over <= devices):
            return seen
        owner = (
            f"a device with this piece's uuid {uuid!r} whose table was changed outside "
            f"libdm ({_shown(table)})"
        )
    elif not found and unmarked is not None and table and table == list(unmarked):
        return seen
    else:
        owner = _owner(info, table)
    raise ForeignDeviceError(
        f"device-mapper device {name!r} is not a linear piece of pool {pool!r}: it is "
        f"{owner}; libdm leaves it alone",
        operation,
        name,
    )


def libdm_pool_named(name: str) -> bool:
    """True if a live device called ``name`` is a libdm pool's device
    (a pool whose devices' names would start with ``name-``)."""
    try:
        info = ops.info(name)
    except NoSuchDeviceError:
        return False
    return (info.uuid or "").startswith(POOL_UUID_PREFIX)


def _thin_params(table: list[Target]) -> ThinParams | None:
    if len(table) != 1 or table[0].type != "thin":
        return None
    try:
        return ThinParams.parse(table[0].params)
    except ValueError:
        return None


def _shown(table: list[Target]) -> str:
    return "; ".join(map(str, table)) or "no table"


def _kind(table: list[Target]) -> str:
    if not table:
        return "a device with no table"
    types = sorted({t.type for t in table})
    return f"a {'/'.join(types)} device"


def _owner(info: DeviceInfo, table: list[Target]) -> str:
    """Who made the device, as far as its uuid and table tell."""
    uuid = info.uuid or ""
    params = _thin_params(table)
    if uuid.startswith(THIN_UUID_PREFIX):
        if params is not None:
            return (
                f"thin id {params.thin_id} of another libdm pool, "
                f"{_pool_by_devno(params.pool_dev)} (uuid {uuid!r})"
            )
        return f"a device of another libdm pool (uuid {uuid!r})"
    if uuid.startswith(POOL_UUID_PREFIX):
        return f"the pool device of another libdm pool (uuid {uuid!r})"
    if uuid.startswith(PIECE_UUID_PREFIX):
        return f"a linear piece of another libdm pool (uuid {uuid!r})"
    if uuid:
        return f"{_kind(table)} with uuid {uuid!r}, not made by libdm"
    joined = "and" if not table else "with"  # "a device with no table and no uuid"
    return f"{_kind(table)} {joined} no uuid, not made by libdm"


def _pool_by_devno(devno: str) -> str:
    """``pool '<name>'`` for the device numbered ``devno``, or the number."""
    for entry in ops.list_devices():
        if f"{entry.major}:{entry.minor}" == devno:
            return f"pool {entry.name!r}"
    return f"the pool on device {devno}"
