"""The JSON-lines manifest of batch jobs: records, torn and malformed lines, what runs again."""
import json
import logging
import os
from dataclasses import dataclass

import pytest

from sounddiffusion.errors import AudioError, OutputError
from sounddiffusion.jobs.manifest import Manifest, file_key, settings_digest


@dataclass(frozen=True)
class Item:
    key: str


def test_record_appends_one_json_line_with_outputs_relative_to_the_manifest(tmp_path):
    manifest = Manifest(tmp_path / "out" / "manifest.jsonl")
    picture = tmp_path / "out" / "a" / "mfcc-00000.png"
    elsewhere = tmp_path / "other.png"
    manifest.record("a", "finished", [picture, str(elsewhere)], "worker-1@h", seconds=1.5)
    manifest.record("b", "skipped", [], "worker-2@h", "b.wav: not a sound file")
    lines = manifest.path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["outputs"] == ["a/mfcc-00000.png", str(elsewhere.resolve())]
    assert (first["key"], first["status"], first["worker"], first["error"], first["seconds"]) == \
        ("a", "finished", "worker-1@h", None, 1.5)
    assert json.loads(lines[1])["error"] == "b.wav: not a sound file"
    with pytest.raises(ValueError, match="status 'done'"):
        manifest.record("c", "done", [], "w")


def test_torn_last_line_is_ignored_and_the_next_record_starts_a_fresh_line(tmp_path):
    manifest = Manifest(tmp_path / "manifest.jsonl")
    manifest.record("a", "finished", [], "w")
    with open(manifest.path, "ab") as f:
        f.write(b'{"key": "b", "status": "fini')  # a crash in the middle of a write
    assert list(manifest.latest()) == ["a"]
    manifest.record("c", "finished", [], "w")
    assert list(manifest.latest()) == ["a", "c"]
    assert manifest.path.read_bytes().count(b"\n") == 3


def test_plan_reruns_missing_outputs_and_failures_skips_the_rest(tmp_path):
    manifest = Manifest(tmp_path / "manifest.jsonl")
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.png").write_bytes(b"png")
        manifest.record(name, "finished", [tmp_path / f"{name}.png"], "w")
    manifest.record("d", "skipped", [], "w", "unreadable")
    manifest.record("e", "failed", [], "w", "RuntimeError: boom")
    (tmp_path / "b.png").unlink()
    plan = manifest.plan([Item(k) for k in "abcdefa"])
    assert [item.key for item in plan.todo] == ["b", "e", "f"]
    assert sorted(plan.done) == ["a", "c", "d"]
    assert list(plan.skipped) == ["d"]
    manifest.record("e", "finished", [], "w")  # later lines win
    assert manifest.latest()["e"]["status"] == "finished"


def test_missing_manifest_is_empty_and_an_unwritable_one_is_a_user_error(tmp_path):
    assert Manifest(tmp_path / "none.jsonl").latest() == {}
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write the manifest"):
        Manifest(tmp_path / "file" / "manifest.jsonl").record("a", "finished", [], "w")


def test_file_key_changes_with_the_file_and_the_settings(tmp_path):
    sound = tmp_path / "a.wav"
    sound.write_bytes(b"1234")
    os.utime(sound, ns=(10**18, 10**18))
    assert file_key(sound) == f"{sound} size=4 mtime_ns={10**18}"
    digest = settings_digest({"seed": 42, "steps": 5})
    assert digest == settings_digest({"steps": 5, "seed": 42}) != settings_digest({"seed": 43, "steps": 5})
    assert file_key(sound, settings=digest).startswith(f"{digest} {sound} ")
    sound.write_bytes(b"12345")
    assert "size=5" in file_key(sound)
    assert file_key(tmp_path / "missing.wav").endswith("size=? mtime_ns=?")


def test_malformed_lines_are_ignored_with_one_warning_and_their_items_made_again(tmp_path, caplog):
    """Lines edited by hand or written by something else never crash a job (README: ignored)."""
    manifest = Manifest(tmp_path / "manifest.jsonl")
    (tmp_path / "a.png").write_bytes(b"png")
    manifest.record("a", "finished", [tmp_path / "a.png"], "w")
    bad = [{"key": "b", "status": "finished", "outputs": [5]},
           {"key": "c", "status": "skipped", "outputs": []},  # a skipped entry needs its reason
           {"key": "d", "status": "finished", "outputs": ["x\u0000y"]},
           {"key": "e", "status": "finished", "outputs": [""]},  # "" would name the folder itself
           {"key": 7, "status": "finished", "outputs": []},
           {"key": "f", "status": "done", "outputs": []},
           {"key": "g", "status": "finished", "outputs": "g.png"},
           ["h", "finished"], "i", 3]
    with open(manifest.path, "a") as f:
        f.writelines(json.dumps(line) + "\n" for line in bad)
        f.write("[" * 100_000 + "\n")  # deeper than json can read
    caplog.set_level(logging.WARNING, logger="sounddiffusion")
    plan = manifest.plan([Item(k) for k in "abcdefgh"])
    assert [item.key for item in plan.todo] == list("bcdefgh")
    assert list(plan.done) == ["a"] and plan.skipped == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "11 line(s)" in warnings[0] and "line 2" in warnings[0], warnings


def test_an_item_not_finished_needs_its_reason(tmp_path):
    manifest = Manifest(tmp_path / "manifest.jsonl")
    for status in ("skipped", "deferred", "failed"):
        with pytest.raises(ValueError, match="reason"):
            manifest.record("a", status, [], "w")
    assert not manifest.path.exists()


class FlakyWorker:
    """Sound "b" is locked by another process until ``unlocked``; "c" is not a sound at all."""

    def __init__(self, folder, unlocked=False):
        self.folder, self.unlocked, self.calls = folder, unlocked, []

    def process(self, item):
        self.calls.append(item.key)
        if item.key == "b" and not self.unlocked:
            raise OutputError("another process is rendering b.mp4 now: wait for it to end")
        if item.key == "c":
            raise AudioError("c.txt is not an audio file that can be decoded")
        path = self.folder / f"{item.key}.png"
        path.write_bytes(b"png")
        return [str(path)]


def test_transient_user_errors_are_deferred_and_tried_again_permanent_ones_skipped(tmp_path, caplog):
    """Through the job loop without Ray: a lock held elsewhere is deferred (tried again by the
    next run), a file that is not a sound is skipped for good; the summary says which is which."""
    from sounddiffusion.jobs.batch_jobs import run_in_process

    manifest = Manifest(tmp_path / "manifest.jsonl")
    items = [Item(k) for k in "abc"]
    first = FlakyWorker(tmp_path)
    summary = run_in_process(items, lambda: first, manifest=manifest, unit="song")
    assert first.calls == ["a", "b", "c"]
    latest = manifest.latest()
    assert [latest[k]["status"] for k in "abc"] == ["finished", "deferred", "skipped"]
    assert summary.deferred == [("b", "another process is rendering b.mp4 now: wait for it to end")]
    assert summary.skipped == [("c", "c.txt is not an audio file that can be decoded")]
    report = summary.report("song")
    assert "1 song made" in report and "1 skipped, 1 deferred, 0 failed, of 3" in report
    # (the reasons name the keys here, so they are not repeated before them)
    assert "1 song skipped (the input cannot be made; not tried again until it changes):\n" \
           "  c.txt is not an audio file" in report
    assert "1 song deferred (tried again on the next run):\n  another process" in report

    second = FlakyWorker(tmp_path, unlocked=True)
    again = run_in_process(items, lambda: second, manifest=manifest, unit="song")
    assert second.calls == ["b"]  # "a" is made, "c" stays skipped
    assert manifest.latest()["b"]["status"] == "finished"
    assert (again.finished, again.already_done, again.deferred) == (1, 2, [])
    assert [key for key, _ in again.problems] == ["c"]
    assert "1 song skipped (the input cannot be made" in again.report("song")


def test_a_sound_that_cannot_be_opened_now_may_pass_one_that_is_no_sound_cannot(tmp_path, monkeypatch):
    import errno
    import pathlib

    from sounddiffusion.sound.audio import load_audio

    text = tmp_path / "notes.wav"
    text.write_text("not a sound at all, " * 20)
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    for path in (text, folder):
        with pytest.raises(AudioError) as error:
            load_audio(path)
        assert error.value.permanent, error.value
    real_open = pathlib.Path.open

    def refusing_open(path, *args, **kwargs):  # as a file without read permission (even for root)
        if path.name == "notes.wav":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refusing_open)
    with pytest.raises(AudioError, match="permission denied") as error:
        load_audio(text)
    assert not error.value.permanent
