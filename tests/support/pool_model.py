"""The model of tests/test_stateful.py: the pool as plain Python (its
devices, their sizes and the pages written to them), the operations a
step runs (in the test's process, or in a child that is killed), and the
figures a run counts.  The sizes and counts of a run are here too."""

import collections
import copy
import json
from dataclasses import dataclass, field

from support import reliability

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4 * KiB
BLOCK = 64 * KiB  # the pool's data block size
BLOCK_SECTORS = BLOCK // 512
DATA_SIZE = 64 * MiB
META_SIZE = 2 * MiB
MAX_DATA = 256 * MiB
MAX_META = 16 * MiB
MAX_DEVICES = 10
MAX_WRITES = 40  # per example: at most ~2 blocks each, far from filling the pool

TOTAL_STEPS = reliability.scale(50, 2000)
TOTAL_KILLS = reliability.scale(5, 200)
STEPS_PER_EXAMPLE = reliability.scale(20, 50)
BLOCK_STEPS = reliability.scale(20, 500)  # the block pool's machine
BLOCK_KILLS = reliability.scale(2, 50)
MAX_ROUNDS = 40
KILL_MODE = 16  # a step's mode is drawn from 0..19: 16, 17 kill at a point, 18, 19 at a time
CHILD_TIMEOUT = 120.0  # a child that takes longer is hung: the pool is wedged

# The state-changing operations the machine draws, and the named crash
# points each of them can reach.
POINTS_FOR = {
    "create_pool": ("pool:created",),
    "create_thin": ("create:intent", "create:message", "create:transaction", "create:recorded"),
    "snapshot": (
        "create:intent",
        "snapshot:suspended",
        "create:message",
        "create:transaction",
        "create:recorded",
    ),
    "delete": ("delete:deactivated", "delete:intent", "delete:message", "delete:transaction"),
    "resize_thin": ("resize_device:recorded",),
    "activate": (),
    "deactivate": (),
    "resize": ("grow:intent", "grow:backing", "grow:loaded", "grow:resumed"),
    "refresh": ("grow:intent", "grow:backing", "grow:loaded", "grow:resumed"),
    "set_low_water_mark": ("grow:intent", "grow:backing", "grow:loaded", "grow:resumed"),
    "monitor": ("grow:intent", "grow:backing", "grow:loaded", "grow:resumed"),
    "reopen": (),
    "restart": (),
}
BLOCK_POINTS_FOR = dict(
    POINTS_FOR,
    create_block_pool=("pool:created",),
    extend=("grow:intent", "grow:backing", "grow:loaded", "grow:resumed"),
)
OPERATIONS = (*tuple(POINTS_FOR), "write")

# The operations themselves, run in this process or, to be killed, in a
# child (the same source, so both run exactly the same calls).
OPS_SOURCE = r'''
def apply(pool, op, a):
    """Run one state-changing operation; return something JSON can carry."""
    import libdm
    if op == "create_pool":
        libdm.Pool.create_loop(a["name"], a["directory"], data_size=a["data"],
                               metadata_size=a["meta"], min_free_space=0).close()
    elif op == "create_block_pool":
        libdm.Pool.create(a["name"], a["data"], a["meta"], state_dir=a["directory"],
                          min_free_space=0).close()
    elif op == "extend":
        pool.extend(a["device"], metadata=a["metadata"])
    elif op in ("open", "reopen"):
        libdm.Pool.open(a["directory"]).close()
    elif op == "create_thin":
        pool.create_thin(a["name"], a["size"])
    elif op == "snapshot":
        pool.device(a["origin"]).snapshot(a["name"])
    elif op == "delete":
        pool.device(a["name"]).delete()
    elif op == "resize_thin":
        pool.device(a["name"]).resize(a["size"], force=a["force"])
    elif op == "activate":
        pool.device(a["name"]).activate()
    elif op == "deactivate":
        pool.device(a["name"]).deactivate()
    elif op == "resize":
        pool.resize(data_size=a["data"], metadata_size=a["meta"])
    elif op == "refresh":
        pool.refresh()
    elif op == "set_low_water_mark":
        pool.set_low_water_mark(a["blocks"])
    elif op == "monitor":
        monitor = pool.monitor(threshold=a["threshold"], percent=a["percent"],
                               metadata_threshold=a["meta_threshold"], reserve=512)
        return [[s.part, int(s.old_size), int(s.new_size), s.error] for s in monitor.check()]
    elif op == "restart":
        pool.destroy()
    else:
        raise AssertionError(f"unknown operation {op!r}")
    return None
'''

CHILD = (
    OPS_SOURCE
    + r"""
import json, sys
import libdm
req = json.loads(sys.argv[1])
pool = None
if req["op"] not in ("create_pool", "create_block_pool", "open", "reopen"):
    pool = libdm.Pool.load(req["args"]["directory"])
print("ready", flush=True)
sys.stdin.readline()
try:
    out = {"ok": True, "value": apply(pool, req["op"], req["args"])}
except Exception as exc:
    import traceback
    out = {"ok": False, "type": type(exc).__name__, "message": str(exc),
           "where": traceback.format_exc().strip().splitlines()[-3:-1]}
print(json.dumps(out), flush=True)
"""
)

_ops = {}
exec(OPS_SOURCE, _ops)
apply_op = _ops["apply"]


class StepFailed(AssertionError):
    """A step's outcome or the pool afterwards is wrong (the message says how)."""


# -- the model -----------------------------------------------------------------------


@dataclass
class Dev:
    size: int  # bytes
    parent: object  # name or None
    active: bool
    pages: dict = field(default_factory=dict)  # 4 KiB page index -> tag of its write
    thin_id: object = None  # learned from the store when the device appears


@dataclass
class Model:
    devices: dict
    txid: int = 0
    data_size: int = DATA_SIZE  # the data file, bytes
    meta_size: int = META_SIZE  # the metadata file, bytes
    lwm: int = 0

    def copy(self):
        return copy.deepcopy(self)

    @property
    def data_sectors(self):
        """The pool table's length: whole data blocks of the data file."""
        return self.data_size // BLOCK * BLOCK_SECTORS

    @property
    def meta_blocks(self):
        return self.meta_size // 4096

    def leaves(self):
        parents = {d.parent for d in self.devices.values()}
        return sorted(n for n in self.devices if n not in parents)


UNKNOWN = -1  # a page whose content the model does not know (not checked)


def pattern(tag):
    return tag.to_bytes(8, "little") * (PAGE // 8)


def describe_page(data):
    if data == bytes(PAGE):
        return "zeros"
    tag = int.from_bytes(data[:8], "little")
    if data == pattern(tag):
        return f"write #{tag}"
    return f"other bytes ({data[:16].hex()}...)"


# -- figures shared by every example of a run ---------------------------------------------


class Stats:
    def __init__(self):
        self.steps = 0
        self.kills = 0
        self.examples = 0
        self.ops = collections.Counter()
        self.killed_ops = collections.Counter()
        self.points = collections.Counter()  # named crash points that fired
        self.losses = 0
        self.disagreements = 0
        self.wedged = 0
        self.failures = []


# How often each kind of step is picked.
WEIGHTS = (
    ("write", 16),
    ("overwrite", 8),
    ("create_thin", 14),
    ("snapshot", 12),
    ("delete", 10),
    ("resize_thin", 6),
    ("activate_or_deactivate", 8),
    ("grow_or_tune", 20),
    ("reopen_or_restart", 8),
)

CONTEXT = {}  # dm_name factory, work directory and Stats, set by the test


def page_runs(pages):
    """Consecutive page numbers as (first, count) runs of at most 64 pages."""
    runs = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] == p and runs[-1][1] < 64:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return [tuple(r) for r in runs]


def short(value):
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) < 300 else text[:300] + "..."
