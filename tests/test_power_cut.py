"""Power cuts: a kernel stopped with pools live and nothing torn down,
then a new kernel on the same backing files, and ``Pool.open``."""

import json
import os
import sys

import pytest
from support import reliability

pytestmark = pytest.mark.host

STEPS = os.path.join(os.path.dirname(__file__), "power_cut_steps.py")


def step(run_in_kernel, name, directory, pool_name):
    result = run_in_kernel([sys.executable, STEPS, name, str(directory), pool_name], timeout=300)
    assert result.returncode == 0, result.stderr + result.console[-2000:]
    with open(directory / "result.json") as fh:
        return json.load(fh)


def test_power_cut_keeps_synced_data_and_lineage(run_in_kernel, tmp_path):
    directory = tmp_path / "pool"
    pool_name = f"libdmtest-powercut-{os.getpid()}"
    before = step(run_in_kernel, "build", directory, pool_name)
    # Each boot below starts after an unsynced halt with everything live.
    cycles = reliability.scale(2, 20)
    for cycle in range(cycles):
        after = step(run_in_kernel, "check", directory, pool_name)
        for name, seen in before["devices"].items():
            got = after["devices"][name]
            assert (got["thin_id"], got["parent"]) == (seen["thin_id"], seen["parent"]), name
            if seen["sha256"] is not None:
                assert got["sha256"] == seen["sha256"], f"{name} lost data in cycle {cycle}"
        assert set(after["devices"]) == set(before["devices"])
        assert after["transaction_id"] == before["transaction_id"]
        for name, seen in before["devices"].items():  # active ones came back, only those
            assert after["devices"][name]["active"] == seen["active"], name
        before = step(run_in_kernel, "mutate", directory, pool_name)
    assert before["devices"]["cold"]["active"] is True  # mutate activated it
    final = step(run_in_kernel, "check", directory, pool_name)
    for name, seen in before["devices"].items():
        assert final["devices"][name]["sha256"] == seen["sha256"], name
    assert final["devices"]["layer2"]["parent"] == "layer1"
    assert sum(1 for d in final["devices"] if d.startswith("extra")) == cycles
    reliability.record(
        "power cuts", power_cuts=cycles + 1, losses=0, devices_checked=len(final["devices"])
    )
