"""The typed values of the thin model's support modules, without a kernel:
the monitor's registrations and watch state, a backing's segments and
recorded devices, and the monitor's backoff after a failed step."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from libdm.thin import registry
from libdm.thin.backing import (
    Description,
    LinearBacking,
    RecordedDevice,
    Segment,
    segment_changes,
)
from libdm.thin.config import PoolConfig
from libdm.thin.errors import StateError
from libdm.thin.monitor import Monitor
from libdm.thin.units import Bytes, DataBlocks, MetaBlocks, Sectors

# -- registrations -------------------------------------------------------------------


def test_a_registration_round_trips_through_its_file(tmp_path: Path) -> None:
    reg = registry.Registration(
        str(tmp_path / "pool"), threshold=70, percent=30, max_data_size=1 << 30, spares=["/d"]
    )
    path = registry.register(reg, str(tmp_path / "conf"))
    assert registry.registrations(str(tmp_path / "conf")) == {path: reg}
    assert reg.monitor_options() == {
        "threshold": 70,
        "percent": 30,
        "max_data_size": 1 << 30,
        "spares": ["/d"],
    }


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('pool = "/p"\nthreshold = "80"\n', "'threshold' is '80', not a whole number"),
        ('pool = "/p"\npercent = true\n', "'percent' is True"),
        ('pool = "/p"\nspares = "/dev/x"\n', "'spares' is '/dev/x'"),
        ("threshold = 80\n", "'pool' is None"),
        ('pool = "/p"\ncolour = "red"\n', "unknown key 'colour'"),
    ],
)
def test_a_bad_registration_file_is_refused_and_named(
    tmp_path: Path, text: str, named: str
) -> None:
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(StateError) as raised:
        registry.registrations(str(tmp_path))
    assert str(tmp_path / "p.toml") in str(raised.value)
    assert named in str(raised.value)


def test_watch_state_of_a_registered_pool_without_a_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(registry.CONFIG_ENV, str(tmp_path / "conf"))
    monkeypatch.setenv(registry.RUN_ENV, str(tmp_path / "run"))
    assert registry.watch_state(str(tmp_path / "pool")) is None
    registry.register(registry.Registration(str(tmp_path / "pool"), threshold=60))
    assert registry.watch_state(str(tmp_path / "pool")) == registry.WatchState(
        watched=False, registered=True, threshold=60, percent=20
    )
    # A running service's status file says it watches the pool.
    (tmp_path / "run").mkdir()
    status = {
        "pid": os.getpid(),
        "pools": {
            str(tmp_path / "pool"): {
                "name": "p",
                "running": True,
                "threshold": 60,
                "percent": 20,
            }
        },
    }
    (tmp_path / "run" / "monitor.json").write_text(json.dumps(status))
    state = registry.watch_state(str(tmp_path / "pool"))
    assert state is not None and state.watched and state.registered


# -- a backing's segments -----------------------------------------------------------------

#: A stored configuration without the backing's fields.
RECORD = {
    "block_size": 128,
    "low_water_mark": 0,
    "features": [],
    "min_free_space": 10,
    "deferred_removal": True,
    "deferred_deletion": True,
    "base_device": None,
    "token": "0123456789abcdef0123456789abcdef",
}


def test_segments_keep_their_stored_form() -> None:
    seg = Segment.of(["/dev/x", 8, None])
    assert seg == Segment("/dev/x", Sectors(8), None)
    assert seg.to_json() == ["/dev/x", 8, None]
    backing = LinearBacking(
        "p",
        [["/dev/m", 0, 4096]],
        [["/dev/d", 0, None]],
        [RecordedDevice("/dev/m", Bytes(1 << 22))],
    )
    assert backing.meta_segments == [Segment("/dev/m", Sectors(0), Sectors(4096))]
    assert backing.meta_devices == [RecordedDevice("/dev/m", Bytes(1 << 22))]
    # The stored form is what it was before the values were typed.
    stored = PoolConfig.from_record(RECORD).with_backing(**backing.config()).to_record()
    assert stored == dict(
        RECORD,
        meta_segments=[["/dev/m", 0, 4096]],
        data_segments=[["/dev/d", 0, None]],
        meta_segment_devices=[{"path": "/dev/m", "size": 1 << 22}],
    )
    assert backing.describe() == Description("/dev/d", "/dev/m (sectors 0+4096)")
    assert backing.paths() == ["/dev/m", "/dev/d"]


def test_segment_changes_are_in_the_stored_form() -> None:
    config = PoolConfig.from_record(dict(RECORD, data_segments=[["/dev/d", 0, None]]))
    changes = segment_changes(config, "data_segments", [["/dev/d", 0, 64], ["/dev/e", 0, None]])
    assert changes == {"data_segments": [Segment("/dev/d", 0, 64), Segment("/dev/e", 0, None)]}
    assert config.with_backing(**changes).to_record() == dict(
        RECORD, data_segments=[["/dev/d", 0, 64], ["/dev/e", 0, None]]
    )


# -- the monitor's backoff ---------------------------------------------------------------


@dataclass
class _Status:
    used_data: DataBlocks
    total_data: DataBlocks
    used_meta: MetaBlocks
    total_meta: MetaBlocks
    failed: bool = False
    state: str = "rw"


@dataclass
class _FullPool:
    """A pool 90% full that cannot grow: every step fails."""

    name: str = "fake"
    kind: str = "adopted"
    statuses: int = 0
    marks: list[int] = field(default_factory=list)

    def status(self) -> _Status:
        self.statuses += 1
        return _Status(DataBlocks(90), DataBlocks(100), MetaBlocks(1), MetaBlocks(100))

    def data_size(self) -> Bytes:
        return Bytes(100 << 16)

    @property
    def block_size(self) -> Sectors:
        return Sectors(128)

    def set_low_water_mark(self, blocks: int) -> None:
        self.marks.append(blocks)

    def settle(self) -> str | None:
        return None  # nothing a crash left


def test_a_failed_step_backs_off_and_the_wait_doubles(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("libdm.thin.monitor.time.monotonic", lambda: now[0])
    pool: Any = _FullPool()
    monitor = Monitor(pool, threshold=80)
    waits = []
    for _ in range(12):
        steps = monitor.check()
        assert [(s.part, s.ok) for s in steps] == [("data", False)]
        assert "no way to grow the data" in str(steps[0].error)
        assert monitor._retry_at is not None
        waits.append(monitor._retry_at - now[0])
        reads = pool.statuses
        assert monitor.check() == []  # backing off: the status is not even read
        assert pool.statuses == reads
        now[0] = monitor._retry_at
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert [s.part for s in monitor.history] == ["data"] * 12


def test_a_monitor_closes_its_wake_pipe_when_it_goes() -> None:
    import gc

    before = set(os.listdir("/proc/self/fd"))
    for _ in range(50):
        Monitor(_FullPool())  # type: ignore[arg-type]  # a stand-in pool
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) <= before


# -- the service's retries -------------------------------------------------------------


def test_the_service_retries_a_pool_it_cannot_watch_less_and_less_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from libdm.service import MonitorService

    now = [0.0]
    monkeypatch.setattr("libdm.service.time.monotonic", lambda: now[0])
    conf = str(tmp_path / "conf")
    registry.register(registry.Registration(str(tmp_path / "nowhere")), conf)
    service = MonitorService(conf, str(tmp_path / "run" / "monitor.json"), rescan=5.0)
    tried = []
    for second in range(0, 400, 5):
        now[0] = float(second)
        caplog.clear()
        service.scan()
        if any("cannot be watched yet" in r.getMessage() for r in caplog.records):
            tried.append(second)
    # At each scan at first, then 10, 20, 40 s apart, then once a minute.
    assert tried == [0, 5, 15, 35, 75, 135, 195, 255, 315, 375]
    with open(tmp_path / "run" / "monitor.json") as fh:
        assert json.load(fh)["pools"] == {
            str(tmp_path / "nowhere"): {
                "name": None,
                "running": False,
                "threshold": 80,
                "percent": 20,
            }
        }
    # A changed registration is tried at once.
    registry.register(registry.Registration(str(tmp_path / "nowhere"), threshold=50), conf)
    now[0] += 1
    caplog.clear()
    service.scan()
    assert any("cannot be watched yet" in r.getMessage() for r in caplog.records)


def test_a_registration_spoilt_while_watched_keeps_its_pool_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from libdm.service import MonitorService

    conf = str(tmp_path / "conf")
    path = registry.register(registry.Registration(str(tmp_path / "nowhere"), threshold=60), conf)
    (tmp_path / "conf" / "typo.toml").write_text('pool = "/x"\nthreshold = \n')
    service = MonitorService(conf, str(tmp_path / "run" / "monitor.json"), rescan=5.0)
    found = registry.read(conf)
    assert list(found.valid) == [path]
    assert [bad.path for bad in found.invalid] == [str(tmp_path / "conf" / "typo.toml")]
    service.scan()
    with open(path, "w") as fh:  # a half-saved edit
        fh.write('pool = "')
    caplog.clear()
    service.scan()
    service.scan()
    reports = [r.getMessage() for r in caplog.records if path in r.getMessage()]
    assert len(reports) == 1 and "stays watched as it was" in reports[0], reports
    with open(tmp_path / "run" / "monitor.json") as fh:
        pools = json.load(fh)["pools"]
    assert pools[str(tmp_path / "nowhere")]["threshold"] == 60
