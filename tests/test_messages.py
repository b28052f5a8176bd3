"""Errors that say what happened and what to do, and nothing logged as an
error that is not one.

Witnesses: the metadata file damaged by hand, the ``libdm`` logger's
records, the CLI's exit status and stderr (a real subprocess).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from support.blockio import MiB, write_at, write_pattern

import libdm
from libdm.thin.units import MAX_SIZE


@pytest.mark.kernel
def test_damaged_metadata_at_open_names_the_pool_its_file_the_reason_and_the_repair(
    dm_name, tmp_path
):
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="128M")
    for n in range(3):
        write_pattern(pool.create_thin(f"vol{n}", "8M").path, 0x30 + n, 0, 8 * MiB)
    name = pool.name
    pool.destroy()  # a reboot: nothing live, files and store kept
    meta = directory / "metadata"
    write_at(meta, 20 * 4096, os.urandom(4096))  # a node of a device's mappings
    with pytest.raises(libdm.PoolFailedError) as caught:
        libdm.Pool.open(directory)
    text = str(caught.value)
    assert f"pool {name!r}" in text
    assert str(meta) in text  # the file, not the loop device attached for the check
    assert "/dev/loop" not in text
    assert "bad checksum in btree node (block 20)" in text  # thin_check's own words
    # The library says the call; the command says its command line.
    assert "; Pool.repair() repairs it and keeps the damaged copy" in text
    assert "libdm pool" not in text
    cli = subprocess.run(
        [sys.executable, "-m", "libdm", "pool", "open", str(directory)],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 1, cli
    assert f"; libdm pool repair --pool {directory} repairs it" in cli.stderr, cli.stderr
    assert "Pool.repair" not in cli.stderr, cli.stderr


@pytest.mark.kernel
def test_a_snapshot_of_an_inactive_origin_logs_no_error(make_pool, caplog):
    pool = make_pool(data_size="64M")
    origin = pool.create_thin("vol", "8M")
    write_pattern(origin.path, 0x61, 0, MiB)
    origin.deactivate()
    with caplog.at_level(logging.DEBUG, logger="libdm"):
        snap = origin.snapshot("snap")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    with open(snap.path, "rb") as fh:
        assert fh.read(MiB) == b"\x61" * MiB


@pytest.mark.parametrize(
    ("text", "size"),
    [("1E", 1 << 60), ("7E", 7 << 60), ("7.5EiB", 15 << 59), ("2 eb", 2 << 60)],
)
def test_the_exbibyte_suffix_is_a_size(text, size):
    assert libdm.parse_size(text) == size


def test_the_largest_size_can_be_written_with_any_suffix():
    assert libdm.parse_size(f"{MAX_SIZE // 512}s") == MAX_SIZE
    with pytest.raises(ValueError, match="too large"):
        libdm.parse_size("8E")


def test_a_size_that_is_not_one_lists_every_suffix():
    with pytest.raises(ValueError) as caught:
        libdm.parse_size("10X")
    for suffix in ("K", "M", "G", "T", "P", "E", "s (sectors)"):
        assert suffix in str(caught.value)


@pytest.mark.parametrize("command", [["pool", "info"], ["thin", "ls"]])
def test_an_empty_pool_option_is_refused_not_replaced_by_the_environment(tmp_path, command):
    env = dict(os.environ, LIBDM_POOL=str(tmp_path / "elsewhere"))
    proc = subprocess.run(
        [sys.executable, "-m", "libdm", *command, "--pool", ""],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc
    assert "--pool" in proc.stderr and "empty" in proc.stderr
    assert "elsewhere" not in proc.stderr
