"""run_on_ray on a local Ray instance (2 CPUs, 2 workers) with a trivial worker.

The worker writes one .npy per item, drawn from a generator seeded by the item, so every output
can be compared with a plain loop in this process. Ray starts once for the module; tests that
need it skip when Ray is not installed.
"""
import json
import math
import os
import sys
import uuid
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sounddiffusion.errors import AudioError, OutputError, ParameterError
from sounddiffusion.jobs.cluster import ClusterError, actor_options, import_ray, run_on_ray
from sounddiffusion.jobs.manifest import Manifest
from sounddiffusion.jobs.outcomes import make_batch, takes_batches

pytestmark = pytest.mark.slow  # Ray: python -m pytest -m slow (CI runs them)

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class NoiseItem:
    key: str
    seed: int


@dataclass(frozen=True)
class MakeNoiseWorker:
    """make_worker: picklable settings whose call builds the worker (in the actor's process)."""

    outdir: str
    unreadable: tuple[str, ...] = ()   # keys whose "sound" cannot be read (a permanent UserError)
    locked: tuple[str, ...] = ()       # keys whose output is locked while OUTDIR/lock-held exists
    die_on: str | None = None          # key whose first try kills the worker process
    marker: str | None = None          # exists once that first try happened
    seconds: float = 0.05              # per item, so that both workers get items
    batches: bool = False              # the worker has process_batch (and logs its calls)
    wait_for_workers: int = 0          # items wait until this many workers have started

    def __call__(self):
        return BatchNoiseWorker(self) if self.batches else NoiseWorker(self)


class NoiseWorker:
    def __init__(self, settings: MakeNoiseWorker):
        self.settings = settings
        self.started = Path(settings.outdir) / "started"
        self.started.mkdir(exist_ok=True)
        (self.started / str(os.getpid())).touch()

    def process(self, item: NoiseItem) -> list[str]:
        s = self.settings
        deadline = time.monotonic() + 60
        # However late a worker starts, the first does not make every item alone before it.
        while len(list(self.started.iterdir())) < s.wait_for_workers and time.monotonic() < deadline:
            time.sleep(0.05)
        if item.key in s.unreadable:
            raise AudioError(f"{item.key}: not a sound file")
        if item.key in s.locked and (Path(s.outdir) / "lock-held").exists():
            raise OutputError(f"another process is rendering {item.key} now")
        if item.key == s.die_on and not os.path.exists(s.marker):
            Path(s.marker).touch()
            os._exit(1)  # the process dies mid-item, as when killed or out of memory
        time.sleep(s.seconds)
        return [str(save_noise(Path(s.outdir), item))]


class BatchNoiseWorker(NoiseWorker):
    """Takes batches: each call first writes the keys it got to OUTDIR/calls/<unique>.json."""

    def process_batch(self, items: list[NoiseItem]) -> list[tuple[list[str], Exception | None]]:
        calls = Path(self.settings.outdir) / "calls"
        calls.mkdir(exist_ok=True)
        (calls / f"{uuid.uuid4().hex}.json").write_text(json.dumps([item.key for item in items]))
        results = []
        for item in items:
            try:
                results.append((self.process(item), None))
            except AudioError as exc:
                results.append(([], exc))
        return results


def batch_calls(outdir: Path) -> list[list[str]]:
    """The keys of every process_batch call, sorted."""
    return sorted(json.loads(p.read_text()) for p in (outdir / "calls").glob("*.json"))


def save_noise(outdir: Path, item: NoiseItem) -> Path:
    path = outdir / f"{item.key}.npy"
    np.save(path, np.random.default_rng(item.seed).standard_normal(32))
    return path


def make_items(n: int) -> list[NoiseItem]:
    return [NoiseItem(key=f"item-{i:02d}", seed=1000 + 7 * i) for i in range(n)]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (requirements-cluster.txt)")
    path = os.pathsep.join([str(REPO), str(REPO / "tests")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def run_job(ray_local, tmp_path, items, batch_size=1, **settings):
    manifest = Manifest(tmp_path / "manifest.jsonl")
    summary = run_on_ray(items, MakeNoiseWorker(outdir=str(tmp_path), **settings), address=None,
                         workers=2, manifest=manifest, desc="test", batch_size=batch_size)
    wait_for_free_cpus(ray_local)
    return summary, manifest


def wait_for_free_cpus(ray, timeout: float = 10.0) -> None:
    """The job's actors are gone once both CPUs are free again (ray.kill is asynchronous)."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, f"actors left running: {ray.available_resources()}"
        time.sleep(0.1)


def manifest_keys(manifest: Manifest) -> list[str]:
    return [entry["key"] for entry in manifest.entries()]


def test_every_item_once_same_as_one_process(ray_local, tmp_path):
    items = make_items(12)
    summary, manifest = run_job(ray_local, tmp_path, items, wait_for_workers=2)
    assert summary.finished == 12 and not summary.failed and not summary.skipped
    assert sorted(manifest_keys(manifest)) == [item.key for item in items]
    assert len(summary.per_worker) == 2 and sum(summary.per_worker.values()) == 12
    reference = tmp_path / "reference"
    reference.mkdir()
    for item in items:
        expected = np.load(save_noise(reference, item))
        np.testing.assert_array_equal(np.load(tmp_path / f"{item.key}.npy"), expected)
    assert all(e["outputs"] == [f"{e['key']}.npy"] and e["worker"] in summary.per_worker
               for e in manifest.entries())


def test_rerun_skips_everything_and_remakes_only_deleted_outputs(ray_local, tmp_path):
    items = make_items(6)
    run_job(ray_local, tmp_path, items)
    again, manifest = run_job(ray_local, tmp_path, items)
    assert (again.already_done, again.finished, again.total) == (6, 0, 6)
    assert len(manifest_keys(manifest)) == 6
    (tmp_path / "item-03.npy").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npy")}
    third, manifest = run_job(ray_local, tmp_path, items)
    assert (third.already_done, third.finished) == (5, 1)
    assert manifest_keys(manifest)[6:] == ["item-03"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npy") if p.name != "item-03.npy"} == before
    assert (tmp_path / "item-03.npy").exists()


def test_worker_killed_mid_item_is_restarted_and_item_made_once(ray_local, tmp_path):
    items = make_items(8)
    marker = tmp_path / "died-once"
    summary, manifest = run_job(ray_local, tmp_path, items, die_on="item-02", marker=str(marker))
    assert marker.exists()  # the worker really died on item-02
    assert summary.finished == 8 and not summary.failed
    assert sorted(manifest_keys(manifest)) == [item.key for item in items]
    assert all((tmp_path / f"{item.key}.npy").exists() for item in items)


def test_unreadable_item_is_skipped_and_stays_skipped_a_locked_one_is_tried_again(ray_local, tmp_path):
    items = make_items(5)
    (tmp_path / "lock-held").touch()
    summary, manifest = run_job(ray_local, tmp_path, items, unreadable=("item-01",), locked=("item-03",))
    assert summary.finished == 3
    assert summary.skipped == [("item-01", "item-01: not a sound file")]
    assert summary.deferred == [("item-03", "another process is rendering item-03 now")]
    entry = manifest.latest()["item-01"]
    assert (entry["status"], entry["outputs"], entry["error"]) == ("skipped", [], "item-01: not a sound file")
    assert manifest.latest()["item-03"]["status"] == "deferred"
    (tmp_path / "lock-held").unlink()  # the other process has finished
    again, _ = run_job(ray_local, tmp_path, items, unreadable=("item-01",), locked=("item-03",))
    assert (again.already_done, again.finished, len(again.skipped_earlier), again.deferred) == (4, 1, 1, [])
    assert manifest.latest()["item-03"]["status"] == "finished"
    assert "item-01: not a sound file" in again.report()


def test_batches_of_three_every_item_recorded_once(ray_local, tmp_path):
    items = make_items(10)
    summary, manifest = run_job(ray_local, tmp_path, items, batch_size=3, batches=True, unreadable=("item-04",))
    calls = batch_calls(tmp_path)
    assert len(calls) == math.ceil(10 / 3)  # full batches in the job's order, the last one short
    assert calls == [[f"item-{i:02d}" for i in range(k, min(k + 3, 10))] for k in (0, 3, 6, 9)]
    assert (summary.finished, summary.skipped) == (9, [("item-04", "item-04: not a sound file")])
    assert sorted(manifest_keys(manifest)) == [item.key for item in items]  # each once
    latest = manifest.latest()
    assert (latest["item-04"]["status"], latest["item-04"]["outputs"]) == ("skipped", [])
    assert all(latest[item.key]["outputs"] == [f"{item.key}.npy"] for item in items if item.key != "item-04")
    for item in items:
        if item.key != "item-04":
            expected = np.random.default_rng(item.seed).standard_normal(32)
            np.testing.assert_array_equal(np.load(tmp_path / f"{item.key}.npy"), expected)
    assert sum(summary.per_worker.values()) == 9
    again, _ = run_job(ray_local, tmp_path, items, batch_size=3, batches=True, unreadable=("item-04",))
    assert (again.already_done, again.finished) == (10, 0) and len(batch_calls(tmp_path)) == 4


def test_worker_killed_mid_batch_the_whole_batch_runs_again_each_item_recorded_once(ray_local, tmp_path):
    items = make_items(6)
    marker = tmp_path / "died-once"
    summary, manifest = run_job(ray_local, tmp_path, items, batch_size=3, batches=True,
                                die_on="item-04", marker=str(marker))
    assert marker.exists()  # the worker really died on item-04, after making item-03
    second = ["item-03", "item-04", "item-05"]
    assert batch_calls(tmp_path) == [["item-00", "item-01", "item-02"], second, second]
    assert summary.finished == 6 and not summary.failed
    assert sorted(manifest_keys(manifest)) == [item.key for item in items]
    assert all((tmp_path / f"{item.key}.npy").exists() for item in items)


class BrokenBatchWorker:
    def process(self, item):
        raise AssertionError("not called: this worker takes batches")

    def process_batch(self, items):
        raise RuntimeError("out of memory")


def test_make_batch_one_call_per_batch_else_one_per_item(tmp_path):
    """No Ray: per-item results of a batch worker, a plain worker and a batch that raised."""
    items = make_items(3)
    plain = MakeNoiseWorker(outdir=str(tmp_path), seconds=0.0, unreadable=("item-01",))()
    batching = MakeNoiseWorker(outdir=str(tmp_path), seconds=0.0, unreadable=("item-01",), batches=True)()
    assert not takes_batches(plain) and takes_batches(batching)
    for worker in (plain, batching):
        results = make_batch(worker, items)
        assert [r[:3] for r in results] == [
            ("finished", [str(tmp_path / "item-00.npy")], None),
            ("skipped", [], "item-01: not a sound file"),
            ("finished", [str(tmp_path / "item-02.npy")], None)]
        assert all(r[3] >= 0 for r in results)
    assert len(batch_calls(tmp_path)) == 1  # the batch worker: one call for the three items
    assert [r[:3] for r in make_batch(BrokenBatchWorker(), items)] == \
        [("failed", [], "RuntimeError: out of memory")] * 3


def test_batch_size_below_one_is_refused(tmp_path):
    with pytest.raises(ParameterError, match="batch size 0"):
        run_on_ray(make_items(2), MakeNoiseWorker(outdir=str(tmp_path)), address=None, workers=2,
                   manifest=Manifest(tmp_path / "m.jsonl"), desc="test", batch_size=0)


def test_ctrl_c_keeps_what_is_done_and_the_same_job_continues(ray_local, tmp_path, monkeypatch):
    items = make_items(10)
    real_wait = ray_local.wait
    recorded = tmp_path / "manifest.jsonl"

    def wait_then_interrupt(*args, **kwargs):
        # Ctrl-C once 3 items are recorded, whatever order the workers started in (each wait
        # returns one finished batch of one item, so the loop never records a 4th first).
        if recorded.exists() and len(recorded.read_text().splitlines()) >= 3:
            raise KeyboardInterrupt
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(ray_local, "wait", wait_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match=r"3 of 10 items are done"):
        run_job(ray_local, tmp_path, items)
    monkeypatch.setattr(ray_local, "wait", real_wait)
    wait_for_free_cpus(ray_local)
    manifest = Manifest(tmp_path / "manifest.jsonl")
    assert len(manifest_keys(manifest)) == 3
    rest, manifest = run_job(ray_local, tmp_path, items)
    assert (rest.already_done, rest.finished) == (3, 7)
    assert sorted(manifest_keys(manifest)) == [item.key for item in items]


def test_missing_ray_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ModuleNotFoundError
    with pytest.raises(ClusterError) as caught:
        run_on_ray(make_items(2), MakeNoiseWorker(outdir=str(tmp_path)), address=None, workers=2,
                   manifest=Manifest(tmp_path / "m.jsonl"), desc="test")
    assert str(caught.value) == "Ray is not installed: pip install -r requirements-cluster.txt"
    with pytest.raises(ClusterError):
        import_ray()


def test_actor_options_one_gpu_each_else_a_share_of_the_cpus():
    count, options = actor_options({"CPU": 16.0, "GPU": 4.0}, None)
    assert (count, options["num_gpus"], options["num_cpus"]) == (4, 1, 1)
    assert actor_options({"CPU": 16.0, "GPU": 4.0}, 2)[0] == 2
    with pytest.raises(ParameterError, match="has 4 GPUs"):
        actor_options({"CPU": 16.0, "GPU": 4.0}, 5)
    assert actor_options({"CPU": 2.0}, None)[1]["num_cpus"] == 2      # default: one worker
    assert actor_options({"CPU": 8.0}, 3)[1]["num_cpus"] == 2         # whole CPUs
    assert actor_options({"CPU": 2.0}, 4)[1]["num_cpus"] == 0.5       # more workers than CPUs
    with pytest.raises(ParameterError):
        actor_options({"CPU": 2.0}, 0)
