"""ndvi_scale.waves: a write's regions computed a bounded number at a time, with the same cube as one wave."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ndvi_scale.waves import WAVE_REGIONS, split_waves, wave_regions
from ndvi_scale.write import write_cube
from test_write import make_cube, open_cube, store_bytes

PERIODS = ["2024-01-01", "2024-02-01"]  # make_cube: 3 x 3 chunks a period, 18 regions


def _data(url: str) -> dict[str, bytes]:
    """The chunk objects of a store (the arrays' bytes), without the metadata (history holds the write time)."""
    return {k: v for k, v in store_bytes(url).items() if "/c/" in k or k.split("/")[-1][:1].isdigit()}


def test_split_waves_keeps_periods_apart_and_order() -> None:
    assert split_waves([[1, 2, 3, 4, 5], [6, 7]], 2) == [[1, 2], [3, 4], [5], [6, 7]]
    assert split_waves([[1, 2, 3]], 10) == [[1, 2, 3]]


@pytest.mark.parametrize(("raw", "expected"), [("", WAVE_REGIONS), ("7", 7), ("0", WAVE_REGIONS), ("x", WAVE_REGIONS)])
def test_wave_size_setting(raw: str, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NDVI_SCALE_WAVE_REGIONS", raw)
    assert wave_regions() == expected


def test_local_waves_write_the_same_cube_as_one_wave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = str(tmp_path / "one.zarr")
    report = write_cube(make_cube(PERIODS), one)
    assert report.waves == 2  # one per period
    monkeypatch.setenv("NDVI_SCALE_WAVE_REGIONS", "4")
    many = str(tmp_path / "many.zarr")
    report = write_cube(make_cube(PERIODS), many)
    assert report.waves == 6 and report.regions_written == 18  # ceil(9 / 4) = 3 waves a period
    assert _data(one) == _data(many) and len(_data(one)) >= 2 * 18


def _peak_tasks_on_scheduler(url: str, waves: str | None, monkeypatch: pytest.MonkeyPatch) -> tuple[int, Any]:
    """Write on an in-process distributed cluster; return the most tasks its scheduler held at once."""
    from distributed import Client
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Peak(SchedulerPlugin):
        def __init__(self, scheduler: Any) -> None:
            self.scheduler, self.peak = scheduler, 0

        def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
            self.peak = max(self.peak, len(self.scheduler.tasks))

    if waves is None:
        monkeypatch.delenv("NDVI_SCALE_WAVE_REGIONS", raising=False)
    else:
        monkeypatch.setenv("NDVI_SCALE_WAVE_REGIONS", waves)
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        scheduler = client.cluster.scheduler  # type: ignore[union-attr]
        peak = Peak(scheduler)
        scheduler.add_plugin(peak, name="peak")
        report = write_cube(make_cube(PERIODS, sleep=0.02), url)
    return peak.peak, report


def test_distributed_waves_bound_the_scheduler_and_write_the_same_cube(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, many = str(tmp_path / "one.zarr"), str(tmp_path / "many.zarr")
    peak_one, report_one = _peak_tasks_on_scheduler(one, None, monkeypatch)
    peak_many, report_many = _peak_tasks_on_scheduler(many, "2", monkeypatch)
    assert report_one.waves == 2 and report_many.waves == 10  # ceil(9 / 2) = 5 a period
    assert report_many.regions_written == 18
    # two waves of 2 regions at most on the scheduler, against all 18 regions at once
    print("peak tasks on the scheduler: one wave", peak_one, "waves of 2", peak_many)
    assert peak_many * 3 <= peak_one, (peak_many, peak_one)
    assert _data(one) == _data(many)
    np.testing.assert_array_equal(open_cube(many)["ndvi"].values, make_cube(PERIODS)["ndvi"].values)


# -- run_in_order: the local threaded scheduler's path ----------------------------------------------------------


def _recording_tasks(n: int, *, fail: int | None = None, sleep: float = 0.02) -> tuple[list[Any], dict[str, Any]]:
    """``n`` Delayed tasks sharing one dependency; the log records start order, the shared task's runs and the
    most tasks running at once."""
    import threading
    import time

    import dask

    log: dict[str, Any] = {"started": [], "shared": 0, "running": 0, "peak": 0}
    lock = threading.Lock()

    @dask.delayed(pure=False)
    def shared() -> int:
        with lock:
            log["shared"] += 1
        return 10

    def body(i: int, base: int) -> int:
        with lock:
            log["started"].append(i)
            log["running"] += 1
            log["peak"] = max(log["peak"], log["running"])
        time.sleep(sleep)
        with lock:
            log["running"] -= 1
        if i == fail:
            raise ValueError(f"task {i} failed")
        return base + i

    s = shared()
    return [dask.delayed(body, pure=False)(i, s) for i in range(n)], log


def test_run_in_order_starts_tasks_in_order_shares_dependencies_and_uses_every_thread() -> None:
    from ndvi_scale.waves import run_in_order

    tasks, log = _recording_tasks(7)
    done: list[int] = []
    run_in_order(tasks, 2, on_done=done.append)
    assert sorted(log["started"]) == list(range(7))
    assert log["started"][:2] in ([0, 1], [1, 0]) and log["started"][2:] == sorted(log["started"][2:])
    assert log["shared"] == 1  # the shared dependency ran once, not once per task
    assert log["peak"] == 2  # both threads busy: no barrier
    assert done == list(range(1, 8))


def test_run_in_order_raises_the_first_failure_and_starts_nothing_after_it() -> None:
    from ndvi_scale.waves import run_in_order

    tasks, log = _recording_tasks(12, fail=2, sleep=0.05)
    with pytest.raises(ValueError, match="task 2 failed"):
        run_in_order(tasks, 2)
    assert max(log["started"]) <= 4  # tasks 0-3 at most had started when 2 failed (one more may have been taken)


def test_run_in_order_gives_every_task_the_active_callbacks_and_leaves_them_registered() -> None:
    """dask's synchronous scheduler empties the global ``Callback.active`` while it runs (nested schedulers
    must not see them): two region threads starting at once saw no callbacks, and could restore the empty set
    over the user's. run_in_order hands every thread the callbacks active when it was called."""
    from dask.callbacks import Callback

    from ndvi_scale.waves import run_in_order

    seen: list[Any] = []
    lock = threading.Lock()

    class Count(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
            with lock:
                seen.append(key)

    tasks, _ = _recording_tasks(12, sleep=0.02)
    with Count() as cb:
        run_in_order(tasks, 2)
        assert cb._callback in Callback.active  # still registered: the with-exit would raise KeyError otherwise
    assert {t.key for t in tasks} <= set(seen)  # every task reported, from both threads


def test_local_threaded_write_runs_every_period_in_one_ordered_run(tmp_path: Path) -> None:
    """A cube of one chunk a period (a small area): on the local threaded scheduler all regions go to one
    run_in_order (no barrier per period: two periods run at once, where dask.compute per wave ran one region at a
    time); the synchronous scheduler keeps dask's path; both write the same bytes."""
    import dask

    from ndvi_scale import waves

    seen: list[int] = []
    real = waves.run_in_order

    def spy(tasks: list[Any], threads: int, **kw: Any) -> None:
        seen.append(len(tasks))
        real(tasks, threads, **kw)

    periods = [f"2024-{m:02d}-01" for m in range(1, 5)]
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(waves, "run_in_order", spy)
        with dask.config.set(scheduler="threads", num_workers=2):
            write_cube(make_cube(periods, chunk=128), a)
        with dask.config.set(scheduler="synchronous"):
            write_cube(make_cube(periods, chunk=128), b)
    finally:
        mp.undo()
    assert seen == [len(periods)]  # all regions in one ordered run, only on the threaded scheduler
    assert _data(a) == _data(b)
