"""Docker's own graph-driver conformance functions (``graphtest`` from
Debian's docker.io source: CreateEmpty, CreateBase, CreateSnap,
DeepLayerRead with 50 layers, DiffApply, Changes) against the libdm
plugin, reached through Docker's real plugin proxy, in the test kernel.

The binary is built once in GOPATH mode (tests/support/docker/graphtest_test.go
and build_graphtest.py; no module proxy) and cached under .venv/cache.
"""

import os
import re
import subprocess

import pytest
from support import witness
from support.docker.build_graphtest import build
from support.docker.plugin_util import DockerPlugin, base_device

import libdm

pytestmark = pytest.mark.kernel

FUNCTIONS = [
    "Setup",
    "CreateEmpty",
    "CreateBase",
    "CreateSnap",
    "DeepLayerRead50",
    "DiffApply10Files",
    "Changes",
    "Teardown",
]


def run_graphtest(binary: str, tmp_path, **env: str) -> None:
    """Run every graphtest function with ``env`` added; each must pass,
    in order (the output is kept in graphtest.log)."""
    proc = subprocess.run(
        [binary, "-test.v", "-test.timeout=20m"],
        env=dict(os.environ, TMPDIR=str(tmp_path), **env),
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    (tmp_path / "graphtest.log").write_text(out)
    passed = re.findall(r"--- PASS: Test(\S+)", out)
    assert proc.returncode == 0, out[-6000:]
    assert passed == FUNCTIONS, out[-6000:]


def test_graphtest_through_dockers_proxy(make_pool, tmp_path):
    binary = build()  # cached; .ci/setup.sh builds it on the host
    pool = make_pool(data_size="4G")
    # A plugin name of its own: Docker's proxy finds /run/docker/plugins/NAME.sock.
    name = f"libdm-graphtest-{os.getpid()}"
    sock = f"/run/docker/plugins/{name}.sock"
    plugin = DockerPlugin(
        pool.directory, sock, options=("dm.basesize=64M",), log=str(tmp_path / "plugin.log")
    ).start()
    try:
        run_graphtest(binary, tmp_path, LIBDM_GRAPHTEST_PLUGIN=name)
    finally:
        plugin.stop()
    # Every device in the pool is one the plugin records (graphtest leaves
    # its deep layers), nothing is mounted after Docker's Cleanup, and once
    # the plugin removes what is left, only the base remains.
    with open("/proc/self/mountinfo") as fh:
        assert pool.directory not in fh.read()
    import sqlite3

    db = sqlite3.connect(os.path.join(pool.directory, "docker", "docker.db"))
    layers = [r[0] for r in db.execute("SELECT id FROM layers ORDER BY seq DESC")]
    db.close()
    base = pool.device(base_device(pool)).thin_id
    assert len(witness.thin_ids(pool.name)) == len(layers) + 1
    plugin.start()
    try:
        for layer in layers:
            plugin.client.ok("GraphDriver.Remove", ID=layer)
    finally:
        plugin.stop()
    assert witness.thin_ids(pool.name) == {base}


def test_graphtest_on_dockers_devicemapper_driver_on_a_handed_over_pool(make_pool, tmp_path):
    """The other column: Docker's own devicemapper driver, given a libdm
    pool that was handed to it (dm.thinpooldev), as the guide's direct-lvm
    setup with libdm in LVM's place.  Docker's judgement, then libdm's
    part: the pool reopens although Docker moved its transaction id, and
    grows with Docker's devices in it, which keep their data."""
    binary = build()
    pool = make_pool(data_size="2G")
    pool.hand_over("docker")
    options = ",".join(
        (
            f"dm.thinpooldev=/dev/mapper/{pool.name}",
            "dm.override_udev_sync_check=true",
            "dm.fs=ext4",
            "dm.basesize=128M",
        )
    )
    run_graphtest(
        binary, tmp_path, LIBDM_GRAPHTEST_DRIVER="devicemapper", LIBDM_GRAPHTEST_OPTIONS=options
    )
    # Docker made its devices (graphtest leaves its deep layers) and moved
    # the transaction id; libdm recorded none of them.
    docker_ids = witness.thin_ids(pool.name)
    txid = witness.transaction_id(pool.name)
    assert len(docker_ids) > 50 and txid > 50
    assert pool.devices() == []
    again = libdm.Pool.open(pool.directory)
    try:
        used_before = witness.pool_status(pool.name)[2].split("/")[0]
        again.resize("3G")
        used, total = witness.pool_status(pool.name)[2].split("/")
        assert int(total) * int(again.block_size.bytes()) == 3 << 30
        assert used == used_before
    finally:
        again.close()
    assert witness.thin_ids(pool.name) == docker_ids
    assert witness.transaction_id(pool.name) == txid
