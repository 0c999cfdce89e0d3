"""Video renders: frame count, fps, sound length, previews, naming, resuming after a kill."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile

from sounddiffusion.errors import OutputError, ParameterError
from sounddiffusion.sound.audio import SAMPLE_RATE, fps_fraction, frame_bounds, frame_count
from sounddiffusion.video import ffmpeg, render_state
from video_probe import probe_video
from sounddiffusion.files import unique_output_path
from sounddiffusion.images import read_rgb
from sounddiffusion.video.render import VideoRender

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
SOUND_SECONDS = 2.3
SETTINGS = {"prompt": "waves", "seed": 7, "strength": 0.4}


def synthetic_frame(index: int) -> np.ndarray:
    """Frame ``index`` (64, 64, 3) uint8: a smooth pattern that moves and changes colour."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([(x * 4 + index * 9) % 256, (y * 4 + index * 5) % 256,
                     np.full_like(x, (index * 23) % 256)], axis=-1).astype(np.uint8)


@pytest.fixture
def sound(tmp_path) -> Path:
    """A 2.3 s, 440 Hz sine, mono 44.1 kHz WAV."""
    rate = 44100
    t = np.arange(round(SOUND_SECONDS * rate)) / rate
    path = tmp_path / "sound.wav"
    soundfile.write(path, 0.3 * np.sin(2 * np.pi * 440 * t), rate)
    return path


def add_frames(render: VideoRender, stop: int) -> None:
    """Add frames render.frames_done .. stop-1 with a latent-like checkpoint each."""
    for index in range(render.frames_done, stop):
        latent = np.full((1, 4, 8, 8), index, np.float32)
        render.add_frame(synthetic_frame(index), {"latent": latent}, {"frame": index})


def decoded_frames(path: Path) -> np.ndarray:
    """All frames of a video as (N, H, W, 3) uint8, decoded by ffmpeg."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])


def render_uninterrupted(path: Path, fps, count: int, sound: Path, segment_frames=5) -> Path:
    with VideoRender.open(path, fps, SIZE, SIZE, SETTINGS, segment_frames=segment_frames) as render:
        add_frames(render, count)
        return render.finish(sound)


@pytest.mark.parametrize("fps", [8, 7.5])
def test_video_has_every_frame_and_the_sound(tmp_path, sound, fps):
    count = math.ceil(SOUND_SECONDS * Fraction(str(fps)))  # 19 at 8 fps, 18 at 7.5 fps
    path = render_uninterrupted(tmp_path / "song.mp4", fps, count, sound)
    info = probe_video(path)
    assert info["frames"] == count
    assert info["fps"] == fps
    assert (info["width"], info["height"]) == (SIZE, SIZE)
    assert (info["video_codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert info["has_audio"] and info["audio_codec"] == "aac"
    assert abs(info["audio_duration"] - SOUND_SECONDS) <= 1 / fps
    assert abs(info["duration"] - SOUND_SECONDS) <= 1 / fps
    frames = decoded_frames(path)
    sources = np.stack([synthetic_frame(i) for i in range(count)]).astype(int)
    # Each decoded frame is (lossy) its own source, in order, not a neighbour.
    errors = np.abs(frames[:, None].astype(int) - sources[None]).mean(axis=(2, 3, 4))
    assert (errors.argmin(axis=1) == np.arange(count)).all()
    assert errors.diagonal().max() < 8  # lossy: 4:2:0 chroma blurs the pattern's hard edges


def test_fractional_rate_is_kept_exactly(tmp_path, sound):
    with VideoRender.open(tmp_path / "song.mp4", 29.97, SIZE, SIZE, SETTINGS) as render:
        stored = json.loads((render.state_dir / "settings.json").read_text())
        assert stored["fps"] == "2997/100"
        add_frames(render, 7)
        path = render.finish(None)
    info = probe_video(path)
    assert (info["frames"], info["fps"], info["has_audio"]) == (7, 29.97, False)
    assert info["video_duration"] == pytest.approx(7 / 29.97, abs=0.01)


def test_output_appears_only_at_finish(tmp_path, sound):
    path = tmp_path / "song.mp4"
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, segment_frames=4) as render:
        add_frames(render, 9)
        render.write_preview(sound)
        add_frames(render, 19)
        assert not path.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("song.mp4")] \
            == ["song.mp4.render"]
        assert render.finish(sound) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.mp4", "sound.wav"]


def test_preview_has_the_frames_done_so_far(tmp_path, sound):
    with VideoRender.open(tmp_path / "song.mp4", 8, SIZE, SIZE, SETTINGS,
                          segment_frames=5) as render:
        assert render.write_preview(sound) is None
        add_frames(render, 7)
        preview = render.write_preview(sound)
        assert preview == tmp_path / "song.preview.mp4"
        info = probe_video(preview)
        assert (info["frames"], info["fps"]) == (7, 8)
        assert abs(info["audio_duration"] - 7 / 8) <= 1 / 8
        first = decoded_frames(preview)
        add_frames(render, 12)
        assert probe_video(render.write_preview(sound))["frames"] == 12
        # The finished segment is copied, not encoded again.
        np.testing.assert_array_equal(decoded_frames(preview)[:5], first[:5])
        add_frames(render, 19)
        path = render.finish(sound)
    assert not preview.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.mp4", "sound.wav"]
    # Segments of 5, 5, 5 and 4 frames join without gaps or repeated frames.
    info = probe_video(path)
    assert (info["frames"], info["fps"]) == (19, 8)
    assert info["video_duration"] == pytest.approx(19 / 8, abs=0.01)
    assert len(decoded_frames(path)) == 19


def test_resume_after_close_gives_the_same_video(tmp_path, sound):
    reference = decoded_frames(render_uninterrupted(tmp_path / "reference.mp4", 8, 19, sound))
    path = tmp_path / "song.mp4"
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, segment_frames=5) as render:
        assert render.load_checkpoint() is None
        add_frames(render, 12)
    # The with block closed the render as Ctrl-C would: state kept, no output.
    assert not path.exists()
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, resume=True, segment_frames=5) as render:
        assert render.frames_done == 12
        index, arrays, extra = render.load_checkpoint()
        assert index == 11 and extra == {"frame": 11}
        np.testing.assert_array_equal(arrays["latent"], np.full((1, 4, 8, 8), 11, np.float32))
        add_frames(render, 19)
        result = render.finish(sound)
    # Same frames into the same encoder settings: x264 gives the same stream.
    np.testing.assert_array_equal(decoded_frames(result), reference)


def test_previews_and_interruptions_leave_the_segments_and_the_bytes_alone(tmp_path, sound):
    """Segments start at fixed frames (multiples of segment_frames): a render with previews at
    odd points, interrupted mid-segment and resumed (without saying segment_frames again) is
    the same MP4, byte for byte, as one made in a single go."""
    reference = render_uninterrupted(tmp_path / "reference.mp4", 8, 19, sound).read_bytes()
    path = tmp_path / "song.mp4"
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, segment_frames=5) as render:
        for stop in (3, 7, 12):
            add_frames(render, stop)
            render.write_preview(sound)
        add_frames(render, 13)
    state = tmp_path / "song.mp4.render"
    assert sorted(p.name for p in state.glob("segment-*")) == ["segment-000000-000005.mp4",
                                                               "segment-000005-000010.mp4"]
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, resume=True) as render:
        assert render.segment_frames == 5  # as stored, not the default of 32 at 8 fps
        add_frames(render, 16)
        assert probe_video(render.write_preview(sound))["frames"] == 16
        add_frames(render, 19)
        result = render.finish(sound)
    assert result.read_bytes() == reference


CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path[:0] = [{repo!r}, {tests!r}]
    from sounddiffusion.video.render import VideoRender
    from test_video import SETTINGS, SIZE, add_frames
    render = VideoRender.open({path!r}, 8, SIZE, SIZE, SETTINGS, segment_frames=5)
    add_frames(render, 13)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_resume_after_sigkill_gives_the_same_video(tmp_path, sound):
    reference = decoded_frames(render_uninterrupted(tmp_path / "reference.mp4", 8, 19, sound))
    path = tmp_path / "song.mp4"
    script = CHILD.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(path))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not path.exists()
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, resume=True, segment_frames=5) as render:
        assert render.frames_done == 13
        assert render.load_checkpoint().frame_index == 12
        add_frames(render, 19)
        result = render.finish(sound)
    np.testing.assert_array_equal(decoded_frames(result), reference)
    assert not (tmp_path / "song.mp4.render").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "song.mp4"
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS) as render:
        add_frames(render, 3)
    with pytest.raises(ParameterError, match=r"strength: 0\.4 then, 0\.5 now"):
        VideoRender.open(path, 8, SIZE, SIZE, {**SETTINGS, "strength": 0.5}, resume=True)
    with pytest.raises(ParameterError, match="fps: '8' then, '15/2' now"):
        VideoRender.open(path, 7.5, SIZE, SIZE, SETTINGS, resume=True)
    with pytest.raises(ParameterError, match="size: '64x64' then, '128x64' now"):
        VideoRender.open(path, 8, 128, SIZE, SETTINGS, resume=True)
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, resume=True) as render:
        assert render.frames_done == 3


def test_fresh_render_refuses_an_unfinished_one(tmp_path):
    path = tmp_path / "song.mp4"
    with pytest.raises(OutputError, match="no unfinished render .* run without --resume"):
        VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, resume=True)
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS) as render:
        add_frames(render, 1)
    with pytest.raises(OutputError, match="add --resume to continue it, or delete .*mp4.render"):
        VideoRender.open(path, 8, SIZE, SIZE, SETTINGS)
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, resume=True) as render:
        assert render.frames_done == 1  # the refused fresh start touched nothing


def test_fresh_render_replaces_one_that_stopped_before_its_first_frame(tmp_path):
    """A run that failed at frame 0 (bad model, out of memory) left no frame to continue from:
    the next fresh run starts without asking the user to delete anything."""
    path = tmp_path / "song.mp4"
    VideoRender.open(path, 8, SIZE, SIZE, SETTINGS).close()
    (path.parent / (path.name + ".render") / "frame-000000.png").write_bytes(b"half a picture")
    with VideoRender.open(path, 8, SIZE, SIZE, {**SETTINGS, "strength": 0.9}) as render:
        assert render.frames_done == 0
        add_frames(render, 2)
    stored = json.loads((path.parent / (path.name + ".render") / "settings.json").read_text())
    assert stored["settings"]["strength"] == 0.9
    np.testing.assert_array_equal(read_rgb(path.parent / (path.name + ".render") / "frame-000000.png"),
                                  synthetic_frame(0))


def test_a_render_in_progress_is_left_alone(tmp_path):
    """The same command started twice (two terminals): the second run neither restarts nor
    resumes the render the first one is writing, which goes on undisturbed."""
    path = tmp_path / "song.mp4"
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS) as first:
        for resume in (False, True):
            with pytest.raises(OutputError, match="another process is rendering .*song.mp4 now .* choose another --output"):
                VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, resume=resume)
        add_frames(first, 2)
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, resume=True) as render:
        assert render.frames_done == 2


def test_unique_output_path(tmp_path):
    assert unique_output_path(tmp_path / "song.mp4") == tmp_path / "song.mp4"
    (tmp_path / "song.mp4").write_bytes(b"old")
    assert unique_output_path(tmp_path / "song.mp4") == tmp_path / "song-0001.mp4"
    (tmp_path / "song-0001.mp4").write_bytes(b"old")
    assert unique_output_path(tmp_path / "song.mp4") == tmp_path / "song-0002.mp4"


def test_finish_never_overwrites(tmp_path, sound):
    (tmp_path / "song.mp4").write_bytes(b"an earlier video")
    result = render_uninterrupted(tmp_path / "song.mp4", 8, 3, sound)
    assert result == tmp_path / "song-0001.mp4"
    assert (tmp_path / "song.mp4").read_bytes() == b"an earlier video"
    assert probe_video(result)["frames"] == 3


def test_disk_full_loses_no_finished_frame(tmp_path, sound, monkeypatch):
    reference = decoded_frames(render_uninterrupted(tmp_path / "reference.mp4", 8, 19, sound))
    path = tmp_path / "song.mp4"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, segment_frames=5) as render:
        add_frames(render, 7)
        monkeypatch.setattr(render_state.np, "savez", full_disk)
        with pytest.raises(OutputError, match="disk full .* run again with --resume"):
            add_frames(render, 8)
        monkeypatch.undo()
        assert render.frames_done == 7
        assert not [p for p in render.state_dir.iterdir() if p.name.endswith(".tmp")]
        add_frames(render, 12)  # space is back: the same render goes on
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, resume=True, segment_frames=5) as render:
        assert render.frames_done == 12
        add_frames(render, 19)
        result = render.finish(sound)
    np.testing.assert_array_equal(decoded_frames(result), reference)


def test_encoder_failure_is_reported_and_recoverable(tmp_path, monkeypatch):
    monkeypatch.setattr(ffmpeg, "VIDEO_CODEC", ["-c:v", "no_such_encoder"])
    with VideoRender.open(tmp_path / "song.mp4", 8, SIZE, SIZE, SETTINGS) as render:
        # ffmpeg stops at once; a frame write or the segment's end notices, whichever is first.
        with pytest.raises(OutputError, match="(?s)ffmpeg failed while encoding .*no_such_encoder"):
            add_frames(render, 3)
            render.write_preview(None)
        monkeypatch.undo()
        add_frames(render, 3)
        assert probe_video(render.write_preview(None))["frames"] == 3


def test_ffmpeg_failure_is_reported(tmp_path):
    not_sound = tmp_path / "notes.wav"
    not_sound.write_text("this is not a sound")
    path = tmp_path / "song.mp4"
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS) as render:
        add_frames(render, 2)
        with pytest.raises(OutputError, match="(?s)ffmpeg failed while writing .*notes.wav"):
            render.finish(not_sound)
    assert not path.exists()
    with VideoRender.open(path, 8, SIZE, SIZE, SETTINGS, resume=True) as render:
        assert render.frames_done == 2


def test_bad_frames_and_sizes_are_refused(tmp_path):
    with pytest.raises(ParameterError, match="even width and height"):
        VideoRender.open(tmp_path / "a.mp4", 8, 63, SIZE, SETTINGS)
    with pytest.raises(ParameterError, match="frame rate 0.0: use a positive number"):
        VideoRender.open(tmp_path / "a.mp4", 0.0, SIZE, SIZE, SETTINGS)
    with VideoRender.open(tmp_path / "a.mp4", 8, SIZE, SIZE, SETTINGS) as render:
        with pytest.raises(ValueError, match="uint8 frame"):
            render.add_frame(np.zeros((SIZE, SIZE, 3), np.float32))
        assert render.frames_done == 0


@pytest.mark.parametrize("fps", [30000 / 1001, 29.97, 1 / 3])
def test_audio_and_video_read_the_frame_rate_alike(tmp_path, fps):
    """Frame N's first sound sample (audio.frame_bounds) is where the writer's video reaches
    frame N: the same exact fraction on both sides, also for floats whose printed digits are
    not the fraction (1/3, 30000/1001)."""
    seconds = 0.5 if fps > 1 else 4.0
    n_samples = round(seconds * SAMPLE_RATE)
    count = frame_count(n_samples, fps)
    with VideoRender.open(tmp_path / "song.mp4", fps, SIZE, SIZE, SETTINGS) as render:
        assert render.fps == fps_fraction(fps)
        stored = json.loads((render.state_dir / "settings.json").read_text())
        assert Fraction(stored["fps"]) == fps_fraction(fps)
        add_frames(render, count)
        path = render.finish(None)
    duration = Fraction(count) / render.fps  # what the writer cuts the video to
    assert frame_bounds(count, fps)[0] == math.floor(duration * SAMPLE_RATE)
    assert (count - 1) / render.fps < Fraction(n_samples, SAMPLE_RATE) <= duration
    info = probe_video(path)
    assert info["frames"] == count
    assert info["video_duration"] == pytest.approx(float(duration), abs=0.01)


def ffmpeg_tags(path: Path) -> dict[str, str]:
    """The container tags ``ffmpeg -i`` prints for ``path`` (the first Metadata block)."""
    header = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                            capture_output=True, text=True).stderr
    block = header.split("Metadata:", 1)[1].split("Duration:", 1)[0]
    pairs = (line.split(":", 1) for line in block.strip().splitlines())
    return {key.strip(): value.strip() for key, value in pairs}


def test_settings_are_stored_in_the_mp4_comment(tmp_path, sound):
    comment = json.dumps({**SETTINGS, "prompt": "a café at night", "fps": "30000/1001"},
                         sort_keys=True, ensure_ascii=False)
    with VideoRender.open(tmp_path / "song.mp4", 8, SIZE, SIZE, SETTINGS) as render:
        add_frames(render, 3)
        preview = render.write_preview(sound, metadata={"comment": comment})
        assert json.loads(ffmpeg_tags(preview)["comment"]) == json.loads(comment)
        path = render.finish(sound, metadata={"comment": comment})
    tags = ffmpeg_tags(path)
    assert tags["comment"] == comment
    assert json.loads(tags["comment"]) == {**SETTINGS, "prompt": "a café at night",
                                           "fps": "30000/1001"}
    assert probe_video(path)["frames"] == 3
    plain = render_uninterrupted(tmp_path / "plain.mp4", 8, 3, sound)
    assert "comment" not in ffmpeg_tags(plain)


def test_metadata_key_that_ffmpeg_would_misread_is_refused(tmp_path):
    with pytest.raises(ValueError, match="metadata key 'a=b'"):
        ffmpeg.mux_segments([], tmp_path, Fraction(8), 1, None, output_path=tmp_path / "a.mp4",
                            metadata={"a=b": "c"})
    assert list(tmp_path.iterdir()) == []
