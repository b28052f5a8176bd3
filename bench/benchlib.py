"""Shared pieces of the thin, scale and start-up benchmarks.

* building the C programs on the host;
* ``RawPool``: a thin-pool device on two loop devices over sparse files,
  made with ``losetup`` and libdm's plain device calls, that no libdm
  ``Pool`` owns (for the C program and for Python making the same calls);
* ``ThinOps``: one ``thin_ops serve`` process (``bench/thin_ops.c``);
* ``interleave`` and ``summarize``: the method of ``device_ops.py``
  (paths take turns block by block in a rotating order; a path's figure
  is its median block, a ratio the median of the ratios of blocks that ran
  side by side) for workloads whose block holds several kinds of
  operation (a lifecycle block creates, snapshots and deletes).
"""

import contextlib
import json
import os
import statistics
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_DIR = os.path.join(HERE, "build")
RESULTS_DIR = os.path.join(HERE, "results")

#: Every pool of the benchmarks: sparse data and metadata files of these
#: sizes (metadata enough for 10,000 thin devices and their snapshots).
DATA_SIZE = "100G"
METADATA_SIZE = "256M"
#: Every thin device's size (nothing is written: no data block is used).
THIN_SIZE = 1 << 30


def build_c(source, build_dir=BUILD_DIR, cc=None):
    """Compile ``bench/<source>.c`` into ``build_dir/<source>`` unless the
    binary is newer than the source; return the binary's path.

    Raises:
        subprocess.CalledProcessError: the compiler failed.
    """
    src = os.path.join(HERE, f"{source}.c")
    binary = os.path.join(build_dir, source)
    if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(src):
        return binary
    os.makedirs(build_dir, exist_ok=True)
    cc = cc or os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-Wall", "-o", binary, src, "-ldevmapper"], check=True)
    return binary


def log(text):
    print(text, flush=True)


def meminfo():
    """MemTotal, MemFree and MemAvailable in KiB (inside the kernel)."""
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemFree", "MemAvailable"):
                out[key] = int(value.split()[0])
    return out


# -- a pool no libdm Pool owns ----------------------------------------------------


class RawPool:
    """A ``thin-pool`` device ``name`` over two loop devices attached by
    ``losetup`` to sparse files in ``directory``, with the same table as a
    libdm pool of the same sizes (64 KiB blocks, low water mark 0, no
    features).  :meth:`destroy` removes every device whose name starts
    with ``<name>-``, the pool, the loop devices and the files."""

    def __init__(
        self, name, directory, data_size=DATA_SIZE, metadata_size=METADATA_SIZE, block_sectors=128
    ):
        import libdm

        self.name = name
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.loops = []
        paths = []
        for what, size in (("metadata", metadata_size), ("data", data_size)):
            path = os.path.join(directory, what)
            subprocess.run(["truncate", "-s", size, path], check=True)
            paths.append(path)
        with open(paths[0], "r+b") as fh:  # new metadata starts zeroed
            fh.write(bytes(4096))
            fh.flush()
            os.fsync(fh.fileno())
        for path in paths:
            dev = subprocess.run(
                ["losetup", "--find", "--show", path], check=True, capture_output=True, text=True
            ).stdout.strip()
            self.loops.append(dev)
        devnos = []
        for dev in self.loops:
            st = os.stat(dev)
            devnos.append(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        data_bytes = os.stat(paths[1]).st_size
        length = data_bytes // 512 // block_sectors * block_sectors
        libdm.create(
            name,
            [libdm.Target(0, length, "thin-pool", f"{devnos[0]} {devnos[1]} {block_sectors} 0 0")],
        )
        info = libdm.info(name)
        self.devno = f"{info.major}:{info.minor}"

    def destroy(self):
        import libdm

        for entry in libdm.list_devices():
            if entry.name.startswith(self.name + "-"):
                libdm.remove(entry.name)
        if libdm.exists(self.name):
            libdm.remove(self.name)
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], check=False)
        for what in ("metadata", "data"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, what))
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)


class ThinOps:
    """One ``thin_ops serve`` process working on one pool, timing itself."""

    def __init__(self, binary, pool):
        self.proc = subprocess.Popen(
            [binary, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.txid = self._ask(f"pool {pool}")["txid"]

    def _ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"thin_ops exited with status {self.proc.wait()} after {line!r}")
        return json.loads(answer)

    def run(self, *request):
        """Send one request (see thin_ops.c); return its seconds."""
        return self._ask(" ".join(map(str, request)))["seconds"]

    def close(self):
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


# -- measuring ----------------------------------------------------------------------


def interleave(fns, n, rounds, block, warmup=1, log=log):
    """Time ``rounds`` rounds of ``n`` operations per path, interleaved.

    ``fns`` maps a path to ``fn(k)``, which does one block of ``k``
    operations and returns ``{op: (seconds, count)}`` (a lifecycle block
    does k creates, k snapshots and 2k deletes).  Each round is cut into
    blocks of ``block``; the paths take turns block by block, in an order
    rotated at every block.  ``warmup`` untimed blocks per path come first.

    Returns {path: [[{op: (seconds, count)} per block] per round]}.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn(block)
    names = list(fns)
    times = {path: [] for path in names}
    for r in range(rounds):
        for path in names:
            times[path].append([])
        for i, start in enumerate(range(0, n, block)):
            turn = (r + i) % len(names)
            for path in names[turn:] + names[:turn]:
                times[path][r].append(fns[path](min(block, n - start)))
        if log:
            log(
                f"  round {r + 1}/{rounds}: "
                + ", ".join(
                    f"{path} {sum(s for b in times[path][r] for s, _ in b.values()):.2f} s"
                    for path in names
                )
            )
    return times


def summarize(times, ratios):
    """Per path and op: the median block's ms per op, ops/s and the round
    totals; per ratio ``(a, b)`` and op: the median of the paired blocks'
    ratios of ms per op (the headline) and each round's ratio of totals.

    Returns {"paths": {path: {op: {...}}}, "ratios": {"a/b": {op: {...}}}}.
    """
    out = {"paths": {}, "ratios": {}}
    for path, rounds in times.items():
        ops = list(rounds[0][0])
        out["paths"][path] = {}
        for op in ops:
            per_op = [b[op][0] / b[op][1] for r in rounds for b in r]
            out["paths"][path][op] = {
                "ms_per_op": statistics.median(per_op) * 1e3,
                "ops_per_s": 1 / statistics.median(per_op),
                "p10_ms": _quantile(per_op, 0.1) * 1e3,
                "p90_ms": _quantile(per_op, 0.9) * 1e3,
                "round_totals_s": [sum(b[op][0] for b in r) for r in rounds],
                "count_per_round": sum(b[op][1] for b in rounds[0]),
                "blocks_s": [[b[op][0] for b in r] for r in rounds],
            }
    for a, b in ratios:
        if a not in times or b not in times:
            continue
        out["ratios"][f"{a}/{b}"] = {}
        for op in out["paths"][a]:
            pairs = [
                x[op][0] / x[op][1] / (y[op][0] / y[op][1])
                for ra, rb in zip(times[a], times[b], strict=False)
                for x, y in zip(ra, rb, strict=False)
            ]
            out["ratios"][f"{a}/{b}"][op] = {
                "median_of_blocks": statistics.median(pairs),
                "p10": _quantile(pairs, 0.1),
                "p90": _quantile(pairs, 0.9),
                "rounds": [
                    sum(x[op][0] for x in ra) / sum(y[op][0] for y in rb)
                    for ra, rb in zip(times[a], times[b], strict=False)
                ],
            }
    return out


def _quantile(values, q):
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    began = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - began, result


def median_ms(values):
    return statistics.median(values) * 1e3
