"""A pool's stored configuration, typed: :class:`PoolConfig` and :class:`PoolKind`.

The store keeps the configuration as a JSON object (a plain dict crosses
into it); :meth:`PoolConfig.from_record` reads one, checking every field it
knows and naming the first that is damaged, and :meth:`PoolConfig.to_record`
writes it back.  The backing's own fields (file names, sizes and inodes,
linear segments and their recorded devices) are read into
:class:`BackingFields`, typed values (:class:`Segment`,
:class:`RecordedDevice`, ``Bytes``); whether the pool's kind needs one that
is damaged is the backing's to say (:meth:`BackingFields.damage`, asked by
:func:`libdm.thin.backing.from_config`).  A stored value whose typed form
would not write back exactly what is stored (damaged, ``null``, a record
with keys this libdm does not know) is kept as stored, and so are fields
this libdm does not know, so an unchanged round trip writes the same JSON.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, NamedTuple, TypedDict, TypeVar, Unpack

from libdm.thin.errors import StateError
from libdm.thin.label import LabelRef
from libdm.thin.units import Bytes, DataBlocks, Sectors

__all__ = [
    "BACKING_FIELDS",
    "BackingChanges",
    "BackingFields",
    "ConfigChanges",
    "FieldCheck",
    "PoolConfig",
    "PoolKind",
    "RecordedDevice",
    "Segment",
    "bad_devices",
    "bad_inodes",
    "bad_segments",
]

_T = TypeVar("_T")


class PoolKind(enum.StrEnum):
    """What a pool sits on; equal to its stored string (``pool.kind == "loop"``)."""

    LOOP = "loop"
    BLOCK = "block"
    ADOPTED = "adopted"

    @classmethod
    def parse(cls, value: object, where: str = "the pool state") -> PoolKind:
        """The kind a stored value names.

        Raises:
            StateError: not a kind libdm knows (the field is named).
        """
        try:
            return cls(value if isinstance(value, str) else repr(value))
        except ValueError:
            raise StateError(
                f"{where} is damaged: its field 'kind' is {value!r}, not a pool kind "
                f"libdm knows (loop, block, adopted)",
                "open",
                None,
            ) from None


class Segment(NamedTuple):
    """A region of a block device, in sectors, as a linear table maps it.

    Stored in the pool's state as the JSON list ``[path, start, length]``.

    Attributes:
        path: the block device.
        start: its first sector.
        length: its number of sectors, or ``None`` for "to the end of the
            device" (so a device that grows is picked up by a refresh).
    """

    path: str
    start: Sectors
    length: Sectors | None

    @classmethod
    def of(cls, value: Sequence[Any]) -> Segment:
        """A segment from its stored ``[path, start, length]`` (checked by
        :meth:`BackingFields.damage`) or from another segment."""
        path, start, length = value
        return cls(str(path), Sectors(start), None if length is None else Sectors(length))

    def to_json(self) -> list[str | int | None]:
        """The stored form, ``[path, start, length]``."""
        return [self.path, int(self.start), None if self.length is None else int(self.length)]


class RecordedDevice(NamedTuple):
    """What a pool records of a segment's device when it starts using it,
    so that a later open can tell another device under the same path.

    Stored as the JSON object ``{"path": ..., "size": ...}``, with
    ``"label": {"role": ..., "index": ...}`` when the device carries the
    pool's label (see :mod:`libdm.thin.label`); a device without one (a
    pool made before labels) is known by its path and size only.
    """

    path: str
    size: Bytes
    label: LabelRef | None = None

    def to_json(self) -> dict[str, str | int | dict[str, str | int]]:
        """The stored form, ``{"path": ..., "size": ..., "label": ...}``."""
        out: dict[str, str | int | dict[str, str | int]] = {
            "path": self.path,
            "size": int(self.size),
        }
        if self.label is not None:
            out["label"] = self.label.to_json()
        return out


class BackingChanges(TypedDict, total=False):
    """What :meth:`PoolConfig.with_backing` may change of the backing's
    stored fields, typed; ``None`` clears a field (it is no longer stored)."""

    data_size: Bytes
    metadata_size: Bytes
    data_file: str
    metadata_file: str
    file_inodes: Mapping[str, int]
    meta_segments: Sequence[Segment]
    data_segments: Sequence[Segment]
    meta_segment_devices: Sequence[RecordedDevice] | None
    data_segment_devices: Sequence[RecordedDevice] | None
    spare_segments: Sequence[Segment] | None
    spare_segment_devices: Sequence[RecordedDevice] | None
    damaged_meta_segments: Sequence[Segment] | None


class _Codec(NamedTuple):
    """How one backing field is read from its stored value (``None``: not
    of its type) and written back."""

    read: Callable[[object], object]
    write: Callable[[Any], object]


def _read_size(value: object) -> Bytes | None:
    return Bytes(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _read_text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _read_inodes(value: object) -> Mapping[str, int] | None:
    if bad_inodes(value) is not None or value is None:
        return None
    assert isinstance(value, dict)
    return MappingProxyType({str(k): int(v) for k, v in value.items()})


def _read_segments(value: object) -> tuple[Segment, ...] | None:
    if bad_segments(value) is not None:
        return None
    assert isinstance(value, list)
    return tuple(Segment.of(seg) for seg in value)


def _read_devices(value: object) -> tuple[RecordedDevice, ...] | None:
    if value is None or bad_devices(value) is not None:
        return None
    assert isinstance(value, list)
    return tuple(
        RecordedDevice(str(d["path"]), Bytes(d["size"]), LabelRef.parse(d.get("label")))
        for d in value
    )


def _write_segments(segments: Iterable[Segment]) -> list[list[str | int | None]]:
    return [Segment.of(seg).to_json() for seg in segments]


def _write_devices(
    devices: Iterable[RecordedDevice],
) -> list[dict[str, str | int | dict[str, str | int]]]:
    return [d.to_json() for d in devices]


_SIZE = _Codec(_read_size, int)
_TEXT = _Codec(_read_text, str)
_SEGMENTS = _Codec(_read_segments, _write_segments)
_DEVICES = _Codec(_read_devices, _write_devices)

#: Each of the backing's stored fields (see :mod:`libdm.thin.backing`), and
#: how it is read and written.
_CODECS: Mapping[str, _Codec] = MappingProxyType(
    {
        "data_size": _SIZE,
        "metadata_size": _SIZE,
        "data_file": _TEXT,
        "metadata_file": _TEXT,
        "file_inodes": _Codec(_read_inodes, lambda inodes: {k: int(v) for k, v in inodes.items()}),
        "meta_segments": _SEGMENTS,
        "data_segments": _SEGMENTS,
        "meta_segment_devices": _DEVICES,
        "data_segment_devices": _DEVICES,
        "spare_segments": _SEGMENTS,
        "spare_segment_devices": _DEVICES,
        "damaged_meta_segments": _SEGMENTS,
    }
)

#: The stored fields that belong to the backing (see :mod:`libdm.thin.backing`).
BACKING_FIELDS = frozenset(_CODECS)


def _same_json(a: object, b: object) -> bool:
    """Whether ``a`` and ``b`` are written as the same JSON (``True`` and
    ``1`` are not)."""
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class BackingFields:
    """The backing's own stored fields (:data:`BACKING_FIELDS`), typed;
    ``None``: not stored (or not of its type, see ``kept``).

    Attributes:
        data_size, metadata_size: a loop pool's file sizes.
        data_file, metadata_file: a loop pool's file names.
        file_inodes: the inode of each of a loop pool's files, by name.
        meta_segments, data_segments: a block pool's linear pieces.
        meta_segment_devices, data_segment_devices: what was recorded of
            each segment's device (``None``: a store from before that).
        spare_segments, spare_segment_devices: a repair's spare and its
            devices.
        damaged_meta_segments: metadata segments earlier repairs swapped out.
        kept: stored values whose typed form would not write back exactly
            what is stored (damaged, ``null``, a record with keys this
            libdm does not know), as stored: written back unchanged, and
            named by :meth:`damage` when the pool's kind needs them.
    """

    data_size: Bytes | None = None
    metadata_size: Bytes | None = None
    data_file: str | None = None
    metadata_file: str | None = None
    file_inodes: Mapping[str, int] | None = None
    meta_segments: tuple[Segment, ...] | None = None
    data_segments: tuple[Segment, ...] | None = None
    meta_segment_devices: tuple[RecordedDevice, ...] | None = None
    data_segment_devices: tuple[RecordedDevice, ...] | None = None
    spare_segments: tuple[Segment, ...] | None = None
    spare_segment_devices: tuple[RecordedDevice, ...] | None = None
    damaged_meta_segments: tuple[Segment, ...] | None = None
    kept: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> BackingFields:
        """The backing's fields of a stored configuration (other keys are
        not looked at)."""
        typed: dict[str, object] = {}
        kept: dict[str, object] = {}
        for name, codec in _CODECS.items():
            if name not in record:
                continue
            value = record[name]
            read = codec.read(value)
            if read is not None:
                typed[name] = read
            if read is None or not _same_json(codec.write(read), value):
                kept[name] = value
        # The names are the dataclass's fields (BACKING_FIELDS).
        return cls(**typed, kept=MappingProxyType(kept))  # type: ignore[arg-type]

    def to_record(self) -> dict[str, object]:
        """The fields as the store's JSON keeps them."""
        record: dict[str, object] = {}
        for name, codec in _CODECS.items():
            if name in self.kept:
                record[name] = self.kept[name]
            elif (value := getattr(self, name)) is not None:
                record[name] = codec.write(value)
        return record

    def stored(self, name: str) -> object:
        """The stored JSON value of field ``name`` (``None``: not stored)."""
        return self.to_record().get(name)

    def damage(self, checks: Sequence[FieldCheck]) -> tuple[str, str] | None:
        """The first field of ``checks`` (what a pool's backing needs, see
        :data:`~libdm.thin.backing.FIELD_CHECKS`) that is damaged, and why
        (``"is missing"``, ``"is 'x', not a list of segments"`` ...), or
        ``None``."""
        record = self.to_record()
        for name, bad in checks:
            why = bad(record.get(name))
            if why is not None:
                return name, why
        return None

    def changed(self, changes: Mapping[str, object]) -> BackingFields:
        """These fields with ``changes`` (typed values; ``None`` clears one).
        A field given the value it has keeps its stored form.

        Raises:
            ValueError: a field that is not the backing's.
        """
        strange = sorted(set(changes) - BACKING_FIELDS)
        if strange:
            raise ValueError(f"not fields of a pool's backing: {', '.join(strange)}")
        record = self.to_record()
        for name, value in changes.items():
            if value is None:
                record.pop(name, None)
                continue
            codec = _CODECS[name]
            stored = codec.write(value)
            current = getattr(self, name)
            if current is None or codec.read(stored) != current:
                record[name] = stored
        return BackingFields.from_record(record)


#: A stored field's name, and why its value is damaged (None: it is not).
FieldCheck = tuple[str, Callable[[object], "str | None"]]


def bad_segments(segments: object) -> str | None:
    """Why ``segments`` is not a list of ``[path, start, length]``, or None."""
    if not isinstance(segments, list) or not segments:
        return "is missing" if segments is None else f"is {segments!r}, not a list of segments"
    for seg in segments:
        if not (
            isinstance(seg, list)
            and len(seg) == 3
            and isinstance(seg[0], str)
            and _count(seg[1])
            and (seg[2] is None or _count(seg[2]))
        ):
            return f"holds {seg!r}, not [path, start sector, length or null]"
    return None


def bad_devices(devices: object) -> str | None:
    """Why ``devices`` is not None nor a list of ``{"path", "size"}``, or None."""
    if devices is None:
        return None
    if isinstance(devices, list) and all(
        isinstance(d, dict)
        and isinstance(d.get("path"), str)
        and _count(d.get("size"))
        and (d.get("label") is None or LabelRef.parse(d["label"]) is not None)
        for d in devices
    ):
        return None
    return f"is {devices!r}, not a list of {{path, size, label}} records"


def bad_inodes(inodes: object) -> str | None:
    """Why ``inodes`` is not None nor a map of file names to inodes, or None."""
    if inodes is None or (
        isinstance(inodes, dict) and all(isinstance(v, int) for v in inodes.values())
    ):
        return None
    return f"is {inodes!r}, not a map of names to inodes"


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ConfigChanges(TypedDict, total=False):
    """What :meth:`PoolConfig.but` may change, typed."""

    block_size: Sectors
    low_water_mark: DataBlocks
    features: frozenset[str]
    min_free_space: float
    deferred_removal: bool
    deferred_deletion: bool
    token: str
    base_device: str | None
    base_size: Bytes | None
    discard_on_delete: bool | None
    xfs_nospace_max_retries: int | None
    made_directory: bool | None
    repair: str | None
    handed_to: str | None
    data_size: Bytes
    metadata_size: Bytes
    file_inodes: Mapping[str, int]


#: The changes of :class:`ConfigChanges` that are stored among the backing's fields.
_BACKING_CHANGES = ("data_size", "metadata_size", "file_inodes")


def _empty() -> Mapping[str, object]:
    return MappingProxyType({})


@dataclass(frozen=True)
class PoolConfig:
    """A pool's configuration as stored.

    Attributes:
        block_size: the data block size.
        low_water_mark: free data blocks below which the kernel raises an event.
        features: the thin-pool feature arguments.
        min_free_space: percent of data and metadata kept free.
        deferred_removal, deferred_deletion: Docker's ``dm.use_deferred_*``.
        token: names the uuids of this pool's thin devices.
        base_device: the device set as base for layers, or ``None``.
        base_size: the size of new devices made without one (``None``: the default).
        discard_on_delete: ``None``: the kind's default.
        xfs_nospace_max_retries: ``None``: not set (-1 is xfs's own default).
        made_directory: whether libdm made the state directory (``None``:
            a store written before that was recorded).
        repair: the damaged metadata copy a repair swapped out and has not
            finished with, or ``None``.
        handed_to: the program the pool's thin devices were handed to (see
            :meth:`~libdm.Pool.hand_over`), or ``None``: libdm's own.
        backing: the backing's own fields, typed (see :class:`BackingFields`).
        extra: stored fields this libdm does not know, kept as they are.
    """

    block_size: Sectors
    low_water_mark: DataBlocks
    features: frozenset[str]
    min_free_space: float
    deferred_removal: bool
    deferred_deletion: bool
    token: str
    base_device: str | None = None
    base_size: Bytes | None = None
    discard_on_delete: bool | None = None
    xfs_nospace_max_retries: int | None = None
    made_directory: bool | None = None
    repair: str | None = None
    handed_to: str | None = None
    backing: BackingFields = field(default_factory=BackingFields)
    extra: Mapping[str, object] = field(default_factory=_empty)

    # -- the backing's sizes ----------------------------------------------------------

    @property
    def data_size(self) -> Bytes:
        """A loop pool's data file size.

        Raises:
            StateError: not recorded (not a loop pool, or a damaged store).
        """
        return Bytes(self._backing_int("data_size"))

    @property
    def metadata_size(self) -> Bytes:
        """A loop pool's metadata file size (see :attr:`data_size`)."""
        return Bytes(self._backing_int("metadata_size"))

    def _backing_int(self, name: str) -> int:
        value = self.backing.stored(name)
        if not _is_int(value):
            raise _damaged("the pool state", name, value, "an integer")
        assert isinstance(value, int)
        return value

    # -- changes -------------------------------------------------------------------------

    def but(self, **changes: Unpack[ConfigChanges]) -> PoolConfig:
        """This configuration with fields replaced by typed values (``None``
        clears an optional one); ``data_size``, ``metadata_size`` and
        ``file_inodes`` are the backing's, stored with its fields.  The
        result is checked as :meth:`from_record` checks a stored one.

        Raises:
            StateError: a value of the wrong type (named).
        """
        fields: dict[str, object] = dict(changes)
        backing = {name: fields.pop(name) for name in _BACKING_CHANGES if name in fields}
        # Typed by ConfigChanges; the checker cannot follow the dict it became.
        changed = replace(self, **fields)  # type: ignore[arg-type]
        return changed._with_backing(backing) if backing else changed.checked()

    def with_backing(self, **changes: Unpack[BackingChanges]) -> PoolConfig:
        """This configuration with the backing's own stored fields (see
        :class:`BackingChanges`) replaced by typed values (``None`` clears
        one), checked as :meth:`but` checks.

        Raises:
            ValueError: a field that is not the backing's.
        """
        return self._with_backing(changes)

    def _with_backing(self, changes: Mapping[str, object]) -> PoolConfig:
        return replace(self, backing=self.backing.changed(changes)).checked()

    def checked(self) -> PoolConfig:
        """This configuration, as the store would read it back.

        Raises:
            StateError: a field of the wrong type (named).
        """
        return PoolConfig.from_record(self.to_record(), "the new configuration")

    # -- the store's record ---------------------------------------------------------------

    def to_record(self) -> dict[str, object]:
        """The JSON object the store keeps."""
        record: dict[str, object] = dict(self.extra)
        record.update(self.backing.to_record())
        record.update(
            block_size=int(self.block_size),
            low_water_mark=int(self.low_water_mark),
            features=sorted(self.features),
            min_free_space=self.min_free_space,
            deferred_removal=self.deferred_removal,
            deferred_deletion=self.deferred_deletion,
            token=self.token,
            base_device=self.base_device,
        )
        for name, value in (
            ("base_size", None if self.base_size is None else int(self.base_size)),
            ("discard_on_delete", self.discard_on_delete),
            ("xfs_nospace_max_retries", self.xfs_nospace_max_retries),
            ("made_directory", self.made_directory),
            ("repair", None if self.repair is None else {"damaged": self.repair}),
            ("handed_to", self.handed_to),
        ):
            if value is not None:
                record[name] = value
        return record

    @classmethod
    def from_record(cls, record: object, where: str = "the pool state") -> PoolConfig:
        """Read a stored configuration.

        Args:
            record: the JSON object the store keeps (anything else is refused).
            where: what holds it, for the error (e.g. the store's path).

        Raises:
            StateError: a field missing or of the wrong type; the message
                names the field and what it holds.
        """
        if not isinstance(record, Mapping):
            raise StateError(
                f"{where} is damaged: its configuration is {record!r}, not a JSON object",
                "open",
                None,
            )

        def need(name: str) -> object:
            if name not in record:
                raise StateError(
                    f"{where} is damaged: its field {name!r} is missing; nothing was changed",
                    "open",
                    None,
                )
            return record[name]

        def integer(name: str, value: object, minimum: int | None = None) -> int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise _damaged(
                    where,
                    name,
                    value,
                    "an integer" if minimum is None else f"an integer >= {minimum}",
                )
            if minimum is not None and value < minimum:
                raise _damaged(where, name, value, f"an integer >= {minimum}")
            return value

        def boolean(name: str, value: object) -> bool:
            if not isinstance(value, bool):
                raise _damaged(where, name, value, "true or false")
            return value

        def text(name: str, value: object) -> str:
            if not isinstance(value, str):
                raise _damaged(where, name, value, "a string")
            return value

        features = need("features")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise _damaged(where, "features", features, "a list of strings")
        min_free = need("min_free_space")
        if isinstance(min_free, bool) or not isinstance(min_free, int | float):
            raise _damaged(where, "min_free_space", min_free, "a number")

        def optional(name: str, read: Callable[[str, object], _T]) -> _T | None:
            value = record.get(name)
            return None if value is None else read(name, value)

        repair = record.get("repair")
        if repair is not None and not (
            isinstance(repair, Mapping) and isinstance(repair.get("damaged"), str)
        ):
            raise _damaged(where, "repair", repair, 'an object {"damaged": <file name>}')
        base_size = optional("base_size", lambda n, v: integer(n, v, 0))
        return cls(
            block_size=Sectors(integer("block_size", need("block_size"), 1)),
            low_water_mark=DataBlocks(integer("low_water_mark", need("low_water_mark"), 0)),
            features=frozenset(features),
            min_free_space=min_free,
            deferred_removal=boolean("deferred_removal", need("deferred_removal")),
            deferred_deletion=boolean("deferred_deletion", need("deferred_deletion")),
            token=text("token", need("token")),
            base_device=optional("base_device", text),
            base_size=None if base_size is None else Bytes(base_size),
            discard_on_delete=optional("discard_on_delete", boolean),
            xfs_nospace_max_retries=optional("xfs_nospace_max_retries", integer),
            made_directory=optional("made_directory", boolean),
            repair=None if repair is None else repair["damaged"],
            handed_to=optional("handed_to", text),
            backing=BackingFields.from_record(record),
            extra=MappingProxyType(
                {k: v for k, v in record.items() if k not in BACKING_FIELDS and k not in _KNOWN}
            ),
        )


_KNOWN = frozenset(f for f in PoolConfig.__dataclass_fields__ if f not in ("backing", "extra"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _damaged(where: str, name: str, value: object, what: str) -> StateError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return StateError(
        f"{where} is damaged: its field {name!r} is {shown}, not {what}; nothing was changed",
        "open",
        None,
    )
