"""The JSON-lines manifest of batch jobs: records, torn lines, what runs again."""
import json
import os
from dataclasses import dataclass

import pytest

from sounddiffusion.errors import OutputError
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
    assert sorted(manifest.done()) == ["a", "b", "c", "d"]  # outputs not checked there
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
