"""Which program made a device of a shared pool: a mark in its name.

Several programs can make devices in one pool: the containerd
snapshotter (one per ``root_path``), another service, the user with the
CLI.  A program that cleans up after a crash may delete only its own
devices, and a name prefix proves nothing: the user can call a device
``ctrd-userdata``, and a second snapshotter with an empty database
would take every ``ctrd-`` device for a leftover.

So a program that makes devices draws a random token once, keeps it in
its own private records, and puts it in the name of every device it
makes: ``<prefix><token>-<suffix>``.  A device is that owner's when its
own records name it, or when its name carries the token; anything else
is someone else's, whatever its prefix, and is left alone.
"""

from __future__ import annotations

import dataclasses
import re
import secrets

__all__ = ["DeviceOwner"]

#: Hex digits of a token: 48 random bits, so that two owners sharing a
#: pool never draw the same one, in names short enough for device-mapper.
TOKEN_DIGITS = 12
_TOKEN = re.compile(f"[0-9a-f]{{{TOKEN_DIGITS}}}")


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceOwner:
    """One owner of devices in a pool.

    Attributes:
        prefix: what its new device names start with (``ctrd-``).
        token: its random token (:data:`TOKEN_DIGITS` lowercase hex digits).
    """

    prefix: str
    token: str

    def __post_init__(self) -> None:
        if not _TOKEN.fullmatch(self.token):
            raise ValueError(f"bad device owner token {self.token!r}")
        if "/" in self.prefix:
            raise ValueError(f"bad device name prefix {self.prefix!r}")

    @classmethod
    def new(cls, prefix: str) -> DeviceOwner:
        """An owner with a fresh token (record it before making a device)."""
        return cls(prefix, secrets.token_hex(TOKEN_DIGITS // 2))

    def name(self, suffix: str) -> str:
        """The name of this owner's device ``suffix``: ``<prefix><token>-<suffix>``."""
        if not suffix or "-" in suffix or "/" in suffix:
            raise ValueError(f"bad device name suffix {suffix!r}")
        return f"{self.prefix}{self.token}-{suffix}"

    def marked(self, name: str) -> bool:
        """Whether ``name`` carries this owner's mark (with any prefix, so
        that a changed prefix does not orphan the devices made before)."""
        head, dash, suffix = name.rpartition("-")
        return bool(dash and suffix) and head.endswith(self.token)
