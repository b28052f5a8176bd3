"""The Docker plugin's tar work (libdm.docker.archive) on plain
directories: Docker's rules for whiteouts, opaque directories, changes
and sizes, and paths kept inside the layer whatever its symbolic links
say.  No device-mapper here: the kernel tests drive the same code on
thin snapshots."""

from __future__ import annotations

import io
import os

import pytest
from support.tarball import tar_bytes

from libdm.docker import archive
from libdm.docker.archive import Change, ChangeKind, LayerError
from libdm.docker.server import _ChunkedReader

ROOT = os.geteuid() == 0


def _tar(*entries) -> io.BytesIO:
    """A layer of ``(name, kind, data)`` entries, as a stream."""
    return io.BytesIO(tar_bytes(entries))


def test_symlinks_stay_inside(tmp_path):
    """A layer whose symbolic link points out of it writes through the
    link inside the layer, as Docker's chrooted unpack does."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    layer = _tar(
        ("escape", "sym", str(outside)),
        ("up", "sym", "../../.."),
        ("escape/planted", "file", b"x"),
        ("up/etc/planted", "file", b"y"),
    )
    archive.apply_layer(str(root), layer)
    assert os.listdir(outside) == []
    assert (root / str(outside).lstrip("/") / "planted").read_bytes() == b"x"
    assert (root / "etc" / "planted").read_bytes() == b"y"


def test_names_that_climb_out_are_refused(tmp_path):
    with pytest.raises(LayerError, match="leaves the layer"):
        archive.apply_layer(str(tmp_path), _tar(("../x", "file", b"x")))
    with pytest.raises(LayerError, match="missing file"):
        archive.apply_layer(str(tmp_path), _tar(("l", "link", "nothing")))
    assert os.listdir(tmp_path) == []


def test_whiteouts_and_opaque(tmp_path):
    archive.apply_layer(
        str(tmp_path),
        _tar(
            ("d", "dir", None),
            ("d/a", "file", b"a"),
            ("d/sub", "dir", None),
            ("d/sub/deep", "file", b"d"),
            ("o", "dir", None),
            ("o/old", "file", b"o"),
            ("f", "file", b"f"),
        ),
    )
    size = archive.apply_layer(
        str(tmp_path),
        _tar(
            ("d/.wh.sub", "file", b""),
            ("o/new", "file", b"new"),
            ("o/.wh..wh..opq", "file", b""),
            (".wh.f", "file", b""),
            (".wh..wh.plnk", "dir", None),
        ),
    )
    assert size == 3
    assert sorted(os.listdir(tmp_path)) == ["d", "o"]
    assert os.listdir(tmp_path / "d") == ["a"]
    assert os.listdir(tmp_path / "o") == ["new"]


def test_file_replaced_by_directory_and_back(tmp_path):
    archive.apply_layer(str(tmp_path), _tar(("x", "file", b"1"), ("y", "dir", None)))
    archive.apply_layer(
        str(tmp_path), _tar(("x", "dir", None), ("x/in", "file", b"2"), ("y", "file", b"3"))
    )
    assert (tmp_path / "x" / "in").read_bytes() == b"2"
    assert (tmp_path / "y").read_bytes() == b"3"


def test_changes_follow_docker(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        (d / "dir").mkdir(parents=True)
        (d / "dir" / "same").write_bytes(b"s")
        os.utime(d / "dir" / "same", (1, 1))
    (old / "dir" / "gone").write_bytes(b"g")
    (new / "dir" / "added").write_bytes(b"a")
    (new / "tree").mkdir()
    (new / "tree" / "leaf").write_bytes(b"l")
    (old / "becomes_file").mkdir()
    (old / "becomes_file" / "inner").write_bytes(b"i")
    (new / "becomes_file").write_bytes(b"now a file")
    got = archive.changes(str(new), str(old))
    assert got == [
        Change("/becomes_file", ChangeKind.MODIFY),
        Change("/dir", ChangeKind.MODIFY),
        Change("/dir/added", ChangeKind.ADD),
        Change("/dir/gone", ChangeKind.DELETE),
        Change("/tree", ChangeKind.ADD),
        Change("/tree/leaf", ChangeKind.ADD),
    ]
    assert archive.changes_size(str(new), got) == len(b"now a file") + 1 + 1
    # Without a parent everything is added.
    assert {c.kind for c in archive.changes(str(new), None)} == {ChangeKind.ADD}


def test_export_then_apply_round_trip(tmp_path):
    lower, upper, copy = tmp_path / "lower", tmp_path / "upper", tmp_path / "copy"
    for d in (lower, upper, copy):
        d.mkdir()
    base = _tar(("a", "file", b"a"), ("d", "dir", None), ("d/x", "file", b"x"))
    for d in (lower, upper, copy):
        base.seek(0)
        archive.apply_layer(str(d), base)
    (upper / "a").unlink()
    (upper / "d" / "y").write_bytes(b"y")
    os.link(upper / "d" / "y", upper / "hard")
    os.symlink("d/y", upper / "sym")
    out = io.BytesIO()
    archive.export_changes(str(upper), str(lower), out)
    out.seek(0)
    archive.apply_layer(str(copy), out)
    assert sorted(os.listdir(copy)) == ["d", "hard", "sym"]
    assert os.stat(copy / "hard").st_ino == os.stat(copy / "d" / "y").st_ino
    assert os.readlink(copy / "sym") == "d/y"
    assert archive.changes(str(copy), str(lower)) == archive.changes(str(upper), str(lower))


def test_chunked_body_decoded():
    body = b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\nTrailer: x\r\n\r\n"
    reader = io.BufferedReader(_ChunkedReader(io.BytesIO(body)))
    assert reader.read() == b"abcdefg"
