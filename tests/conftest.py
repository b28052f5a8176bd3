"""Shared test configuration: the device-mapper test harness (see
libdm/testing/pytest_plugin.py, which also declares the ``kernel`` and
``host`` markers), pytester for the harness's own tests, and the
:func:`make_pool` factory.

The tests' helpers are the package ``support`` next to this file
(imported as ``from support import witness``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

import libdm

pytest_plugins = ["libdm.testing.pytest_plugin", "pytester"]

StrPath = str | os.PathLike[str]


class MakePool(Protocol):
    """The type of the :func:`make_pool` fixture."""

    def __call__(
        self,
        data: str | None = None,
        metadata: str | None = None,
        /,
        *,
        name: str = "pool",
        directory: StrPath | None = None,
        **options: Any,
    ) -> libdm.Pool: ...


@pytest.fixture
def make_pool(dm_name: Callable[[str], str], tmp_path: Path) -> Iterator[MakePool]:
    """A factory of pools that are closed after the test, also when it failed.

    ``make_pool(**options)`` creates a loop pool in ``tmp_path / name``
    (``Pool.create_loop``); ``make_pool(data, metadata, **options)`` a pool
    on those block devices with its state directory ``tmp_path / "state"``
    (``Pool.create``).  ``name`` (default ``"pool"``) is the suffix given to
    ``dm_name`` for the pool's device-mapper name, ``directory`` replaces the
    default directory, and the other keyword arguments go to the
    constructor as they are (``data_size``, ``min_free_space``, ...).

    After the test every pool it made is closed, the last made first (its
    devices stay until ``dm_prefix`` removes them; a pool the test closed or
    destroyed itself is left as it is).
    """
    made: list[libdm.Pool] = []

    def make(
        data: str | None = None,
        metadata: str | None = None,
        /,
        *,
        name: str = "pool",
        directory: StrPath | None = None,
        **options: Any,
    ) -> libdm.Pool:
        if data is None and metadata is None:
            where = tmp_path / name if directory is None else directory
            pool = libdm.Pool.create_loop(dm_name(name), where, **options)
        elif data is not None and metadata is not None:
            state_dir = tmp_path / "state" if directory is None else directory
            pool = libdm.Pool.create(dm_name(name), data, metadata, state_dir=state_dir, **options)
        else:
            raise TypeError("make_pool: give both a data and a metadata device, or neither")
        made.append(pool)
        return pool

    yield make
    with contextlib.ExitStack() as closing:
        for pool in made:
            closing.callback(pool.close)  # run last-made first, every one even if one fails


@pytest.fixture
def no_libdm_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``LIBDM_POOL`` in the environment: the command names its pool."""
    monkeypatch.delenv("LIBDM_POOL", raising=False)


@pytest.fixture(params=["in-process", "subprocess"])
def cli_run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """The ``libdm`` command run each way: in this process, and as
    ``python -m libdm`` (see support/cli.py)."""
    from support.cli import run, sh

    return run if request.param == "in-process" else sh
