"""live.py's parts without a model: per-frame numbers and controls, the recording's clock, the sound
input, the address checks, and the mistakes that fail before the model loads."""
import logging
import socket
import sys
import types

import numpy as np
import pytest
import torch

from cli_checks import assert_one_line_error, decoded_frames, write_sound
from sounddiffusion.control.frame_schedules import parse_video_schedules
from sounddiffusion.control.schedules import parse_schedule
from sounddiffusion.errors import AudioError, DeviceError, ModelError, ParameterError, ScheduleError
from sounddiffusion.live import loop
from sounddiffusion.live.controls import LiveControls, live_frame
from sounddiffusion.live.input import FilePlayer, import_sounddevice, open_input
from sounddiffusion.live.record import LiveRecorder
from sounddiffusion.live.server import is_loopback
from sounddiffusion.settings import LiveSettings, ModelSettings
from sounddiffusion.sound.audio import load_audio
from sounddiffusion.video.camera import repeated_move
from sounddiffusion.video.frame_plan import frame_seed, plan_frames
from sounddiffusion.video.motion import Motion2D, motion_matrix
from video_probe import probe_video

ENVELOPES = {"rms": 0.2, "onset": 0.5, "beat": 1.0, "low": 0.1, "mid": 0.3, "high": 0.4, "centroid": 0.6,
             "flux": 0.7}


def variables(index, fps=12.0, **changes):
    return {**ENVELOPES, **changes, "bpm": 120.0, "t": float(index), "s": index / fps, "fps": fps, "max_f": 0.0}


@pytest.mark.parametrize("text", ["0.35 + 0.4*onset", "where(beat > 0.5, 0.8, 0.3)",
                                  "0:(0.2), 10:(0.6), 20:(0.3 + 0.1*onset)", "0:(0.4 + 0*t), 5:(0.2)"])
def test_one_frames_value_is_the_whole_sounds_value_on_that_frame(text):
    schedule = parse_schedule(text, flag="--strength", names=list(variables(0)))
    n = 30
    whole = schedule.evaluate({**ENVELOPES, "bpm": 120.0, "t": np.arange(n, dtype=float),
                               "s": np.arange(n) / 12, "fps": 12.0, "max_f": 0.0}, n)
    for index in (0, 4, 10, 15, 25):
        assert schedule.value_at(variables(index), index) == pytest.approx(whole[index])


def test_live_frame_takes_its_numbers_from_the_schedules_over_the_envelopes():
    settings = LiveSettings(strength="0.2 + 0.5*onset", scale="3 + beat", textstrength="2*centroid", seed=9,
                            textprompt="a lake")
    schedules = parse_video_schedules(settings)
    frame, last_jump = live_frame(settings, schedules, variables(17), 17, 0)
    assert frame.strength == pytest.approx(0.2 + 0.5 * 0.5) and frame.scale == 4.0
    assert frame.textstrength == 1.0  # 1.2 clipped to textstrength's range
    assert frame.noise_seed == frame_seed(9, 17) and frame.time == pytest.approx(17 / 12)
    assert frame.prompt_weights == [("a lake", 1.0)] and last_jump == 0


def test_seed_jumps_hold_the_noise_between_them_as_in_a_file():
    settings = LiveSettings(seed=3, seed_jump="beat")
    schedules = parse_video_schedules(settings)
    frame, jump = live_frame(settings, schedules, variables(5, beat=0.0), 5, 0)
    assert frame.noise_seed == frame_seed(3, 0) and jump == 0
    frame, jump = live_frame(settings, schedules, variables(8, beat=1.0), 8, jump)
    assert frame.noise_seed == frame_seed(3, 8) and jump == 8
    frame, jump = live_frame(settings, schedules, variables(11, beat=0.2), 11, jump)
    assert frame.noise_seed == frame_seed(3, 8)


def test_live_frames_match_a_files_plan_on_the_same_numbers(tmp_path):
    """A constant schedule gives a live frame the very Frame a file's plan gives (colour frames too)."""
    sound = write_sound(tmp_path / "tone.wav", seconds=1.0)
    common = dict(strength="0.4", scale="5", textstrength="0.3", seed=4, textprompt="x", color_coherence="lab",
                  color_coherence_every=2, latent_noise="0.1", contrast="0.9", fps=12)
    plan = plan_frames(LiveSettings(audio=str(sound), **common))
    settings = LiveSettings(**common)
    for index in (0, 3, 6):
        frame, _ = live_frame(settings, parse_video_schedules(settings), variables(index), index, 0)
        assert frame == plan.frame(index)



def test_live_frames_carry_the_camera_motion_and_a_zoom_of_0_is_refused():
    settings = LiveSettings(zoom="1 + 0.1*onset", angle="2", translation_x="3", fps=12)
    frame, _ = live_frame(settings, parse_video_schedules(settings), variables(4, onset=0.5), 4, 0)
    assert frame.motion == Motion2D(zoom=1.05, angle=2, translation_x=3)
    settings = LiveSettings(zoom="1 - onset", fps=12)
    with pytest.raises(ParameterError, match="zoom"):
        live_frame(settings, parse_video_schedules(settings), variables(4, onset=1.0), 4, 0)


def test_a_picture_after_dropped_frames_moves_by_all_of_their_motion():
    """The move over 3 frames of one motion is that motion's matrix applied 3 times, written out."""
    motion = Motion2D(zoom=1.03, angle=4, translation_x=2.5, translation_y=-1, center_x=0.3)
    m = motion_matrix(motion, 96, 64)
    move = repeated_move(motion, 3, 96, 64, "wrap", "latent")
    np.testing.assert_allclose(move.matrix, m @ m @ m, rtol=1e-12)
    assert (move.border, move.space) == ("wrap", "latent")
    assert repeated_move(motion, 0, 96, 64) is None and repeated_move(Motion2D(), 5, 96, 64) is None

def test_a_change_applies_whole_or_not_at_all():
    controls = LiveControls(LiveSettings(strength="0.5", seed=1))
    with pytest.raises(ScheduleError, match="--strength"):
        controls.change({"seed": 5, "strength": "0.3 +* onset"})
    for bad in ({"seed": True}, {"seed": "abc"}, {"seed": -1}, {"seed": "²"}, {"seed": "--5"}, {"colour": 1}, {"strength": [1]}, {"prompt": 3},
                {"textstrength": 1.5}, {}, ["strength"]):
        with pytest.raises(ParameterError):
            controls.change(bad)
    assert controls.values() == {"prompt": "", "textstrength": "0.5", "strength": "0.5", "seed": 1}
    assert controls.version == 0
    assert controls.change({"strength": 0.25, "seed": "7", "prompt": "fog"}) == {
        "prompt": "fog", "textstrength": "0.5", "strength": "0.25", "seed": 7}
    settings, schedules, version = controls.current()
    assert version == 1 and settings.textprompt == "fog" and schedules.values["strength"].constant == 0.25


def test_max_f_needs_seconds_live():
    with pytest.raises(ParameterError, match="max_f"):
        LiveControls(LiveSettings(strength="t / max_f"))
    LiveControls(LiveSettings(strength="t / max_f", seconds=10))


def test_a_constant_edge_on_flip_is_refused_live():
    """Constant flip angles that turn the plane edge-on would skip every picture: refused at the start;
    a scheduled one that passes edge-on skips only those frames."""
    with pytest.raises(ParameterError, match="edge-on"):
        LiveControls(LiveSettings(perspective_flip_phi="90"))
    with pytest.raises(ParameterError, match="edge-on"):
        LiveControls(LiveSettings(perspective_flip_phi="30", perspective_flip_gamma="-90"))
    LiveControls(LiveSettings(perspective_flip_phi="90*onset"))
    LiveControls(LiveSettings(perspective_flip_phi="89"))


def test_the_recording_shows_each_picture_from_when_it_was_ready(tmp_path):
    """Video frame j shows the picture on show j / fps s after the first sample (black before)."""
    fps, sr = 10, 44100
    recorder = LiveRecorder(tmp_path / "rec.mp4", fps, 64, 64)
    start = 100.0
    block = np.full(sr // 10, 0.25, np.float32)
    for k in range(20):  # 2 s of sound, in blocks of 0.1 s captured on time
        recorder.add_sound(block, start + (k + 1) * 0.1)
    colours = {0.35: (200, 0, 0), 1.02: (0, 200, 0), 1.05: (0, 0, 200)}  # the green one is never in a frame
    for at, colour in colours.items():
        recorder.show(np.full((64, 64, 3), colour, np.uint8), start + at)
    path = recorder.finish()
    info = probe_video(path)
    assert info["frames"] == 20 and info["has_audio"] and info["audio_duration"] == pytest.approx(2.0, abs=0.05)
    means = decoded_frames(path).reshape(20, -1, 3).mean(axis=1)
    dominant = [int(np.argmax(m)) if m.max() > 100 else -1 for m in means]
    assert dominant == [-1] * 4 + [0] * 7 + [2] * 9  # frames 0-3 black, 4-10 red (ready 0.35 s), then blue
    assert not list(tmp_path.glob(".rec.mp4.live-*"))  # the working folder is gone


def test_the_recording_is_as_long_as_its_sound_however_late_the_pictures(tmp_path):
    """A picture ready before the sound reaches its time waits for the sound; one ready after the
    sound's end is not recorded (1 s of sound: 10 frames at 10 fps, never more)."""
    recorder = LiveRecorder(tmp_path / "rec.mp4", 10, 64, 64)
    start, half = 100.0, np.full(44100 // 2, 0.25, np.float32)
    recorder.add_sound(half, start + 0.5)
    recorder.show(np.full((64, 64, 3), (200, 0, 0), np.uint8), start + 0.72)  # from frame 8 = ceil(7.2)
    recorder.add_sound(half, start + 1.0)
    recorder.show(np.full((64, 64, 3), (0, 0, 200), np.uint8), start + 1.4)  # 0.4 s after the sound's end
    path = recorder.finish()
    info = probe_video(path)
    assert info["frames"] == 10 and info["audio_duration"] == pytest.approx(1.0, abs=0.05)
    means = decoded_frames(path).reshape(10, -1, 3).mean(axis=1)
    assert [int(np.argmax(m)) if m.max() > 100 else -1 for m in means] == [-1] * 8 + [0] * 2


def test_the_file_player_hands_on_the_whole_sound_then_its_end(tmp_path):
    sound = write_sound(tmp_path / "tone.wav", seconds=0.3)
    player = FilePlayer(sound)
    with player:
        blocks = []
        while (block := player.blocks.get(timeout=30)) is not None:
            blocks.append(block)
    np.testing.assert_array_equal(np.concatenate([b.samples for b in blocks]), load_audio(sound))
    assert all(later.captured >= earlier.captured for earlier, later in zip(blocks, blocks[1:]))


def test_sound_inputs_that_cannot_be_used_say_why(tmp_path, monkeypatch):
    with pytest.raises(AudioError, match="no such sound file"):
        open_input(str(tmp_path / "missing.wav"))
    with pytest.raises(DeviceError, match="device_index"):
        open_input(str(write_sound(tmp_path / "tone.wav")), device_index=1)
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # not installed
    with pytest.raises(DeviceError, match="pip install sounddevice"):
        import_sounddevice()
    fake = tmp_path / "fake" / "sounddevice.py"
    fake.parent.mkdir()
    fake.write_text("raise OSError('PortAudio library not found')\n")  # what sounddevice raises then
    monkeypatch.delitem(sys.modules, "sounddevice")
    monkeypatch.syspath_prepend(str(fake.parent))
    with pytest.raises(DeviceError, match="PortAudio library"):
        import_sounddevice()


def fake_sounddevice(monkeypatch, *, busy: bool = False, refuse_start: bool = False) -> list:
    """A stand-in for the sounddevice module (a device at 44.1 kHz) whose streams are listed in the
    list returned; ``busy``: opening one fails, ``refuse_start``: starting one fails, as PortAudio does."""
    streams = []

    class PortAudioError(Exception):
        pass

    class InputStream:
        def __init__(self, **kwargs):
            if busy:
                raise PortAudioError("Error opening InputStream: Device unavailable [PaErrorCode -9985]")
            self.closed = self.active = False
            streams.append(self)

        def start(self):
            if refuse_start:
                raise PortAudioError("Error starting stream: Invalid sample rate [PaErrorCode -9997]")
            self.active = True

        def stop(self):
            self.active = False

        def close(self):
            self.active, self.closed = False, True

    module = types.ModuleType("sounddevice")
    module.PortAudioError, module.InputStream = PortAudioError, InputStream
    module.query_devices = lambda device, kind: {"default_samplerate": 44100.0, "max_input_channels": 1}
    monkeypatch.setitem(sys.modules, "sounddevice", module)
    return streams


def test_a_device_portaudio_refuses_is_one_line_and_loop_needs_a_file(monkeypatch):
    fake_sounddevice(monkeypatch, busy=True)
    with pytest.raises(DeviceError, match="default input device cannot record .*Device unavailable"):
        open_input("mic")
    fake_sounddevice(monkeypatch, refuse_start=True)
    microphone = open_input("mic", device_index=2)
    with pytest.raises(DeviceError, match="--device_index 2 cannot record .*Invalid sample rate"), microphone:
        pass
    with pytest.raises(ParameterError, match="--loop"):
        open_input("mic", loop=True)


@pytest.mark.parametrize("failure", ["port taken", "model fails", "Ctrl-C while loading"])
def test_the_microphone_is_closed_whatever_stops_the_start(monkeypatch, failure):
    streams = fake_sounddevice(monkeypatch)
    raised = {"model fails": ModelError("no model"), "Ctrl-C while loading": KeyboardInterrupt()}.get(failure)

    def load_engine(model, loras):
        raise raised

    monkeypatch.setattr(loop, "load_engine", load_engine)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1] if failure == "port taken" else 0
        with pytest.raises((ParameterError, ModelError, KeyboardInterrupt)) as stopped:
            loop.run_live(LiveSettings(input="mic", port=port), ModelSettings(demo=True))
    assert stopped.type is (ParameterError if raised is None else type(raised))
    assert len(streams) == 1 and streams[0].closed


def test_a_schedule_that_fails_on_every_frame_warns_once(tmp_path, monkeypatch, caplog):
    """log(onset) is -inf on silence: every frame of a silent second is skipped, with one warning."""
    silence = write_sound(tmp_path / "silence.wav", seconds=1.0, kind="silence")
    monkeypatch.setattr(loop, "set_cpu_threads", lambda device: None)
    engine = types.SimpleNamespace(device=torch.device("cpu"))  # never reached: each frame fails before
    settings = LiveSettings(input=str(silence), strength="log(onset)", port=0, fps=24, rest=0)
    with caplog.at_level(logging.WARNING):
        summary = loop.run_live(settings, ModelSettings(demo=True), engine=engine, announce=lambda line: None)
    skipped = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(skipped) == 1 and "log(onset)" in skipped[0], skipped
    assert summary.frames == 0 and summary.dropped >= 20 and summary.seconds == pytest.approx(1.0)


def test_only_loopback_addresses_count_as_local():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.org"))


def test_mistakes_fail_before_the_model_loads(run_tool, tmp_path, monkeypatch):
    sound = write_sound(tmp_path / "tone.wav")
    base = ["--demo", "--input", sound, "--port", "0"]
    cases = [(["--strength", "0.3 +* onset"], ("--strength", "column 6")),
             (["--seconds", "0"], ("--seconds",)),
             (["--seconds", "inf"], ("--seconds",)),
             (["--bend", "add=0.1@output_blocks.99"], ("output_blocks.99",)),
             (["--port", "70000"], ("--port",)),
             (["--H", "100"], ("--H 100",)),
             (["--strength", "t/max_f"], ("max_f", "--seconds"))]
    for extra, words in cases:
        assert_one_line_error(*run_tool("live", [*base, *extra])[::2], "live", *words)
    assert_one_line_error(*run_tool("live", ["--demo", "--input", tmp_path / "nope.wav"])[::2], "live", "no such")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(*run_tool("live", ["--demo", "--input", sound, "--port", port])[::2], "live",
                              f"--port {port}")
    assert_one_line_error(*run_tool("live", ["--demo", "--input", "mic", "--loop"])[::2], "live", "--loop")
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    for args in (["--demo"], ["--list_devices"]):
        assert_one_line_error(*run_tool("live", args)[::2], "live", "sounddevice")
