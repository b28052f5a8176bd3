"""A pool's stored configuration, typed: :class:`PoolConfig` and :class:`PoolKind`.

The store keeps the configuration as a JSON object (a plain dict crosses
into it); :meth:`PoolConfig.from_record` reads one, checking every field it
knows and naming the first that is damaged, and :meth:`PoolConfig.to_record`
writes it back.  The backing's own fields (file names and sizes, linear
segments) are carried as they are stored and checked by
:func:`libdm.thin.backing.from_config`, which owns them; fields this libdm
does not know are kept, so a round trip loses nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, TypedDict, TypeVar, Unpack

from libdm.thin.errors import StateError
from libdm.thin.units import Bytes, DataBlocks, Sectors

__all__ = ["BACKING_FIELDS", "ConfigChanges", "PoolConfig", "PoolKind"]

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


#: The stored fields that belong to the backing (see :mod:`libdm.thin.backing`).
BACKING_FIELDS = frozenset(
    {
        "data_size",
        "metadata_size",
        "data_file",
        "metadata_file",
        "file_inodes",
        "meta_segments",
        "data_segments",
        "meta_segment_devices",
        "data_segment_devices",
        "spare_segments",
        "spare_segment_devices",
        "damaged_meta_segments",
    }
)


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


def _stored(value: object) -> object:
    """A typed value as the store's JSON keeps it."""
    if isinstance(value, Mapping):
        return {str(k): _stored(v) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)  # a unit, a plain number
    return value


def _empty() -> Mapping[str, Any]:
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
        backing: the backing's own fields, as stored (see :data:`BACKING_FIELDS`).
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
    backing: Mapping[str, Any] = field(default_factory=_empty)
    extra: Mapping[str, Any] = field(default_factory=_empty)

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
        value = self.backing.get(name)
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
        return changed.with_backing(backing) if backing else changed.checked()

    def with_backing(self, fields: Mapping[str, object]) -> PoolConfig:
        """This configuration with the backing's own stored fields (see
        :data:`BACKING_FIELDS`) replaced by the backing's stored form of
        them, checked as :meth:`but` checks.

        Raises:
            ValueError: a field that is not the backing's.
        """
        strange = sorted(set(fields) - BACKING_FIELDS)
        if strange:
            raise ValueError(f"not fields of a pool's backing: {', '.join(strange)}")
        stored = {name: _stored(value) for name, value in fields.items()}
        return replace(self, backing=MappingProxyType({**self.backing, **stored})).checked()

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
        record.update(self.backing)
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
            backing=MappingProxyType({k: v for k, v in record.items() if k in BACKING_FIELDS}),
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
