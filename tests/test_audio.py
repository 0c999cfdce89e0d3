"""sounddiffusion.sound.audio: finding, loading, decoding errors, frame slicing, RMS."""
import logging
import os
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile

from sounddiffusion.errors import AudioError, ParameterError
from sounddiffusion.sound.audio import (SAMPLE_RATE, find_audio_files, fps_fraction, frame_bounds,
                                        frame_count, frame_slice, frame_slices, iter_frame_slices, load_audio,
                                        slice_rms)


def sine(seconds: float, sr: int, frequency: float = 441.0, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(round(seconds * sr)) / sr)


def dominant_frequency(y: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.fft.rfftfreq(len(y), 1 / sr)[spectrum.argmax()])


# -- finding files

def test_find_audio_files_sorted_audio_only(tmp_path):
    for name in ("b.wav", "a.FLAC", "c.mp3", "notes.txt", "cover.png", "d.ogg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.wav").mkdir()
    assert [p.name for p in find_audio_files(tmp_path)] == ["a.FLAC", "b.wav", "c.mp3", "d.ogg"]


# -- loading real recordings

def test_load_stereo_mixes_channels(audio_dir):
    path = audio_dir / "JK_Organ2_120-F.wav"
    stereo, sr = soundfile.read(path, dtype="float32")
    y = load_audio(path)
    assert sr == SAMPLE_RATE and stereo.shape[1] == 2
    assert y.dtype == np.float32 and y.shape == (len(stereo),)
    np.testing.assert_allclose(y, (stereo[:, 0] + stereo[:, 1]) / 2, atol=1e-7)


def test_load_48k_float_resamples_like_librosa(audio_dir):
    """The samples of librosa.load(path, sr=44100): mono mix, then soxr_hq resampling."""
    import librosa

    path = audio_dir / "synth_chords_short.wav"
    stereo, sr = soundfile.read(path, dtype="float32")
    assert (sr, stereo.shape[1], soundfile.info(path).subtype) == (48000, 2, "FLOAT")
    y = load_audio(path)
    assert y.shape == (-(-len(stereo) * SAMPLE_RATE // 48000),)
    expected = librosa.resample(stereo.mean(axis=1), orig_sr=48000, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_load_other_rate(audio_dir):
    y = load_audio(audio_dir / "Beethoven_chord1.wav", sr=16000)
    assert y.shape == (-(-56946 * 16000 // SAMPLE_RATE),)


# -- loading what we write

@pytest.mark.parametrize(("suffix", "subtype", "sr", "channels", "lossless"), [
    (".wav", "PCM_16", 22050, 1, True),
    (".wav", "FLOAT", 48000, 2, True),
    (".flac", "PCM_24", 44100, 2, True),
    (".ogg", "VORBIS", 32000, 1, False),
    (".mp3", "MPEG_LAYER_III", 44100, 2, False),
])
def test_load_formats(tmp_path, suffix, subtype, sr, channels, lossless):
    y = sine(0.5, sr)
    path = tmp_path / f"tone{suffix}"
    soundfile.write(path, np.stack([y] * channels, axis=1), sr, subtype=subtype)
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    if lossless:
        assert len(loaded) == -(-len(y) * SAMPLE_RATE // sr)
        reference = sine(len(loaded) / SAMPLE_RATE, SAMPLE_RATE)
        # resampling filters ring at the cut edges: compare the middle
        np.testing.assert_allclose(loaded[500:-500], reference[500:-500], atol=2e-3)
    else:
        assert abs(len(loaded) / SAMPLE_RATE - 0.5) < 0.1  # codec delay and frame padding
        assert abs(slice_rms(loaded[4000:-4000]) - 0.5 / np.sqrt(2)) < 0.05
    assert abs(dominant_frequency(loaded) - 441.0) < 5


def test_load_m4a_through_ffmpeg(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    wav, m4a = tmp_path / "tone.wav", tmp_path / "tone.m4a"
    soundfile.write(wav, sine(0.5, 44100), 44100)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)],
                   check=True)
    y = load_audio(m4a)
    assert abs(len(y) / SAMPLE_RATE - 0.5) < 0.1
    assert abs(dominant_frequency(y) - 441.0) < 5


def test_non_finite_samples_become_silence(tmp_path, caplog):
    y = sine(0.1, SAMPLE_RATE).astype(np.float32)
    y[[10, 20, 30]] = [np.nan, np.inf, -np.inf]
    path = tmp_path / "broken.wav"
    soundfile.write(path, y, SAMPLE_RATE, subtype="FLOAT")
    with caplog.at_level(logging.WARNING, logger="sounddiffusion.sound.audio"):
        loaded = load_audio(path)
    assert np.isfinite(loaded).all()
    assert (loaded[[10, 20, 30]] == 0).all()
    np.testing.assert_array_equal(np.delete(loaded, [10, 20, 30]), np.delete(y, [10, 20, 30]))
    assert "3 non-finite samples" in caplog.text and "broken.wav" in caplog.text


# -- errors

def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


def test_missing_file(tmp_path):
    path = tmp_path / "nothing.wav"
    with pytest.raises(AudioError) as error:
        load_audio(path)
    assert_one_line_naming(error, path, "does not exist")


def test_directory(tmp_path):
    with pytest.raises(AudioError) as error:
        load_audio(tmp_path)
    assert_one_line_naming(error, tmp_path, "folder")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="file permissions do not stop root (or this system) from reading")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.wav"
    soundfile.write(path, sine(0.1, SAMPLE_RATE), SAMPLE_RATE)
    path.chmod(0)
    try:
        with pytest.raises(AudioError) as error:
            load_audio(path)
    finally:
        path.chmod(0o644)
    assert_one_line_naming(error, path, "permission denied")


def test_permission_error_is_reported(tmp_path, monkeypatch):
    """The same as test_unreadable_file where permissions cannot be taken away (running as root)."""
    path = tmp_path / "locked.wav"
    soundfile.write(path, sine(0.1, SAMPLE_RATE), SAMPLE_RATE)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(AudioError) as error:
        load_audio(path)
    assert_one_line_naming(error, path, "permission denied")


def test_text_file_renamed_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are my lyrics, not a sound\n" * 20)
    with pytest.raises(AudioError) as error:
        load_audio(path)
    assert_one_line_naming(error, path, "not an audio file", "convert")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError) as error:
        load_audio(path)
    assert_one_line_naming(error, path, "empty")


def test_wav_without_samples(tmp_path):
    path = tmp_path / "header-only.wav"
    soundfile.write(path, np.zeros((0, 1)), SAMPLE_RATE)
    assert path.stat().st_size > 0
    with pytest.raises(AudioError) as error:
        load_audio(path)
    assert_one_line_naming(error, path, "no samples")


@pytest.mark.parametrize("sr", [0, -44100, 44100.0, None])
def test_bad_sample_rate(tmp_path, sr):
    with pytest.raises(ParameterError):
        load_audio(tmp_path / "x.wav", sr=sr)


# -- frame slicing

def expected_bounds(i: int, numerator: int, denominator: int, sr: int = SAMPLE_RATE) -> tuple[int, int]:
    """Frame i at fps = numerator / denominator: [floor(i * sr / fps), floor((i + 1) * sr / fps))."""
    return i * sr * denominator // numerator, (i + 1) * sr * denominator // numerator


@pytest.mark.parametrize(("fps", "numerator", "denominator"), [
    (7.5, 15, 2), (29.97, 2997, 100), (24, 24, 1), (30000 / 1001, 30000, 1001), (Fraction(25, 2), 25, 2),
])
@pytest.mark.parametrize("n_samples", [1, 13230, 44100, 100003])
def test_frame_slices_cover_the_sound(fps, numerator, denominator, n_samples):
    y = np.arange(1, n_samples + 1, dtype=np.float32)  # nonzero, so padding is visible
    slices = frame_slices(y, fps)
    count = -(-n_samples * numerator // (SAMPLE_RATE * denominator))  # ceil(n * fps / sr)
    assert len(slices) == count == frame_count(n_samples, fps)
    for i, piece in enumerate(slices):
        start, end = expected_bounds(i, numerator, denominator)
        assert frame_bounds(i, fps) == (start, end)
        assert piece.shape == (end - start,)
        inside = min(end, n_samples) - start
        np.testing.assert_array_equal(piece[:inside], y[start:start + inside])
        assert (piece[inside:] == 0).all()
    assert start < n_samples <= end  # the last frame holds the last sample
    np.testing.assert_array_equal(np.concatenate(slices)[:n_samples], y)


def test_short_sound_at_24_fps():
    y = np.ones(round(0.3 * SAMPLE_RATE), dtype=np.float32)  # 13230 samples = 7.2 frames
    slices = frame_slices(y, 24)
    assert [len(s) for s in slices] == [1837, 1838] * 4  # 44100 / 24 = 1837.5
    assert slices[-1][:13230 - 12862].all() and not slices[-1][13230 - 12862:].any()  # frame 7 starts at 12862


def test_frame_slices_29_97_boundaries():
    bounds = [frame_bounds(i, 29.97) for i in range(3)]
    assert bounds == [(0, 1471), (1471, 2942), (2942, 4414)]  # 44100 / 29.97 = 1471.47...


def test_iterators_agree():
    y = np.random.default_rng(0).standard_normal(30000).astype(np.float32)
    listed = frame_slices(y, 7.5)
    lazy = list(iter_frame_slices(y, 7.5))
    assert len(listed) == len(lazy) == 6
    for i, (a, b) in enumerate(zip(listed, lazy)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, frame_slice(y, i, 7.5))


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf"), SAMPLE_RATE + 1, "fast"])
def test_bad_fps(fps):
    with pytest.raises(ParameterError):
        frame_slices(np.zeros(100, np.float32), fps)


# -- RMS

@pytest.mark.parametrize(("fps", "expected"), [
    (29.97, Fraction(2997, 100)),
    (30000 / 1001, Fraction(30000, 1001)),  # the float 29.97002997..., not its 17 printed digits
    (7.5, Fraction(15, 2)),
    (12, Fraction(12)),
    (Fraction(30000, 1001), Fraction(30000, 1001)),
    (1 / 3, Fraction(1, 3)),
])
def test_fps_fraction(fps, expected):
    rate = fps_fraction(fps)
    assert type(rate) is Fraction and rate == expected


@pytest.mark.parametrize("fps", [0, -1, 0.0, float("nan"), float("inf"), "fast", None])
def test_fps_fraction_refuses_what_is_no_frame_rate(fps):
    with pytest.raises(ParameterError, match="use a positive number of frames per second"):
        fps_fraction(fps)


def test_slice_rms():
    assert slice_rms(np.zeros(441, np.float32)) == 0.0
    assert slice_rms(np.zeros(0, np.float32)) == 0.0
    assert slice_rms(np.full(100, -0.25, np.float32)) == pytest.approx(0.25)
    assert slice_rms(sine(1.0, SAMPLE_RATE, amplitude=0.8).astype(np.float32)) == pytest.approx(0.8 / np.sqrt(2), rel=1e-5)
