"""Docker's built-in devicemapper driver against the libdm plugin, in one boot.

    python -m libdm.testing run --mem 2G .venv/bin/python bench/docker.py [--rounds 20] [--runs 5]

One kernel, two pools of the same size on sparse loop files: one handed
to Docker's own devicemapper driver (``dm.thinpooldev``), one served by
the libdm plugin (``libdm docker serve``).

* Per graph-driver call: the graphtest binary (tests/support/docker)
  calls each driver directly, the plugin through Docker's real plugin
  proxy, for ``--rounds`` layers: Create, ApplyDiff of a 2 MiB layer,
  CreateReadWrite, Get, Put, Remove; the drivers take turns, round by
  round, in one process.
* End to end: a dockerd on each (both running, used in turns): ``docker
  load`` of a three-layer image, ``docker run --rm``, and ``docker
  commit`` of a container that wrote a file, ``--runs`` times each.

Prints medians with their quartiles and the ratio plugin / built-in, and
writes JSON to bench/results/docker.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support.docker.build_graphtest import build  # noqa: E402
from support.docker.engine_util import (  # noqa: E402
    Dockerd,
    busybox_layer,
    layer_tar,
    prepare_kernel,
    save_archive,
)
from support.docker.plugin_util import DockerPlugin  # noqa: E402

import libdm  # noqa: E402

PLUGIN = "libdmbench"
SOCKET = f"/run/docker/plugins/{PLUGIN}.sock"
CALLS = ("Create", "CreateReadWrite", "Get", "Put", "Remove", "ApplyDiff")
STEPS = ("load", "run --rm", "commit")


def quartiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "n": len(values)}


def time_calls(binary: str, drivers: dict[str, list[str]], rounds: int, tmp: Path) -> dict:
    """{driver: {call: [seconds]}}: the drivers take turns, round by round,
    in one process (see TestTimeCalls in tests/support/docker)."""
    env = dict(
        os.environ,
        LIBDM_GRAPHTEST_TIMING=str(rounds),
        LIBDM_GRAPHTEST_TIMING_DRIVERS=";".join(f"{n}|{','.join(o)}" for n, o in drivers.items()),
        LIBDM_GRAPHTEST_PLUGIN=PLUGIN,
        TMPDIR=str(tmp),
    )
    proc = subprocess.run(
        [binary, "-test.run", "^TestTimeCalls$", "-test.v", "-test.timeout=60m"],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        cwd=tmp,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("LIBDM_TIMING ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the timing run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    times: dict = json.loads(lines[-1].split(" ", 1)[1])
    return times


def end_to_end(dockerd: Dockerd, image: Path, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {step: [] for step in STEPS}
    for i in range(runs):
        start = time.perf_counter()
        dockerd.docker("load", "-i", str(image))
        out["load"].append(time.perf_counter() - start)

        start = time.perf_counter()
        dockerd.docker("run", "--rm", "--network", "none", "bench:latest", "sh", "-c", ":")
        out["run --rm"].append(time.perf_counter() - start)

        name = f"c{i}"
        dockerd.docker(
            "run", "--name", name, "--network", "none", "bench:latest", "sh", "-c",
            "echo changed > /changed",
        )  # fmt: skip
        start = time.perf_counter()
        dockerd.docker("commit", name, f"bench:commit{i}")
        out["commit"].append(time.perf_counter() - start)
        dockerd.docker("rm", name)
        dockerd.docker("rmi", f"bench:commit{i}", "bench:latest")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="layers per timing pass")
    parser.add_argument("--runs", type=int, default=5, help="end-to-end runs per driver")
    parser.add_argument("--size", default="4G", help="each pool's data size")
    args = parser.parse_args()

    binary = build()
    prepare_kernel()
    work = Path(tempfile.mkdtemp(prefix="libdm-bench-docker-", dir="/var/tmp"))
    # Docker's driver takes only a pool without used blocks, and each run
    # of it keeps its own metadata: one handed-over pool per run.
    for name in ("benchdm", "benchdm2"):
        libdm.Pool.create_loop(name, work / name, data_size=args.size).hand_over("docker")
    plugin_pool = libdm.Pool.create_loop("benchplug", work / "plugin-pool", data_size=args.size)
    common = ("dm.basesize=256M", "dm.fs=ext4")
    plugin = DockerPlugin(plugin_pool.directory, SOCKET, options=common).start()
    dm_options = [
        "dm.thinpooldev=/dev/mapper/benchdm",
        "dm.override_udev_sync_check=true",
        "dm.use_deferred_removal=true",
        "dm.use_deferred_deletion=true",
        *common,
    ]
    calls: dict[str, dict[str, list[float]]] = {"devicemapper": {}, "libdm": {}}
    e2e: dict[str, dict[str, list[float]]] = {"devicemapper": {}, "libdm": {}}
    try:
        tmp = work / "calls"
        tmp.mkdir()
        times = time_calls(binary, {"devicemapper": dm_options, "proxy": []}, args.rounds, tmp)
        calls["devicemapper"], calls["libdm"] = times["devicemapper"], times["proxy"]

        image = work / "image.tar"
        save_archive(
            image,
            "bench:latest",
            [busybox_layer(), layer_tar([("a", os.urandom(2 << 20), 0o644)]),
             layer_tar([("b", os.urandom(2 << 20), 0o644)])],
        )  # fmt: skip
        daemons = {}
        e2e_dm_options = [o.replace("benchdm", "benchdm2") for o in dm_options]
        for driver, name, options in (
            ("devicemapper", "devicemapper", e2e_dm_options),
            ("libdm", PLUGIN, []),
        ):
            root = work / f"data-{driver}"
            root.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root)], check=True)
            daemons[driver] = Dockerd(work / driver, root, name, options=options)
            (work / driver).mkdir()
            daemons[driver].start()
        for _turn in range(args.runs):
            for driver, dockerd in daemons.items():
                for step, values in end_to_end(dockerd, image, 1).items():
                    e2e[driver].setdefault(step, []).extend(values)
        for dockerd in daemons.values():
            dockerd.stop()
    finally:
        plugin.stop()

    result = {"calls": {}, "end_to_end": {}, "rounds": args.rounds, "runs": args.runs}
    print(f"{'graph-driver call':<18} {'built-in ms':>12} {'libdm ms':>10} {'libdm/built-in':>15}")
    for call in CALLS:
        a, b = quartiles(calls["devicemapper"][call]), quartiles(calls["libdm"][call])
        ratio = b["median"] / a["median"]
        result["calls"][call] = {"devicemapper": a, "libdm": b, "ratio": ratio}
        print(f"{call:<18} {a['median'] * 1e3:>12.1f} {b['median'] * 1e3:>10.1f} {ratio:>15.2f}")
    print(f"{'end to end':<18} {'built-in s':>12} {'libdm s':>10} {'libdm/built-in':>15}")
    for step in STEPS:
        a, b = quartiles(e2e["devicemapper"][step]), quartiles(e2e["libdm"][step])
        ratio = b["median"] / a["median"]
        result["end_to_end"][step] = {"devicemapper": a, "libdm": b, "ratio": ratio}
        print(f"{step:<18} {a['median']:>12.2f} {b['median']:>10.2f} {ratio:>15.2f}")
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "docker.json"), "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
