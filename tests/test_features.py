"""sounddiffusion.sound.features: the original waveform/fft definitions, mel and MFCC features, edge cases."""
import json
import warnings

import numpy as np
import pytest
import scipy.fft

from sounddiffusion.errors import ParameterError
from sounddiffusion.sound.audio import SAMPLE_RATE, frame_slices, load_audio
from sounddiffusion.sound.features import (FEATURES, _mel_filterbank, featurize, fft_features,
                                           melspectrogram_features, mfcc_features, waveform_features)


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    """The reference check: max |ours - ref| <= 1e-4 * max |ref|."""
    assert ours.shape == reference.shape
    error = np.abs(ours.astype(np.float64) - reference).max() / (1e-6 + np.abs(reference).max())
    assert error <= 1e-4, f"relative error {error:.2e}"


def tone(seconds: float, frequency: float = 1000.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


# -- the original definitions, against the reference data

@pytest.fixture(scope="module")
def reference(reference_dir):
    from safetensors.numpy import load_file

    return load_file(reference_dir / "features.safetensors"), json.loads((reference_dir / "features.json").read_text())


@pytest.mark.parametrize("name", ["Toms_diner", "JK_Organ2_120-F"])
@pytest.mark.parametrize("feature", ["waveform", "fft"])
def test_reference_features(reference, audio_dir, name, feature):
    tensors, meta = reference
    y = load_audio(audio_dir / meta[name]["file"])
    assert_close(featurize(y, feature, dim=768), tensors[f"{name}.whole.{feature}"])
    fps = meta[name]["fps"]
    slices = frame_slices(y, fps)
    assert len(slices) == int(np.ceil(len(y) * fps / SAMPLE_RATE))
    for j, i in enumerate(tensors[f"{name}.fps{fps}.frame_index"]):
        assert_close(featurize(slices[int(i)], feature, dim=768), tensors[f"{name}.fps{fps}.{feature}"][j])


# -- every feature on awkward inputs

INPUTS = {
    "silence": np.zeros(SAMPLE_RATE, np.float32),
    "constant": np.full(3000, 0.5, np.float32),
    "one sample": np.full(1, 0.3, np.float32),
    "441 samples": tone(0.01),
    "noise": np.random.default_rng(1).uniform(-1, 1, 20000).astype(np.float32),
}


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dim", [32, 64, 768])
@pytest.mark.parametrize("kind", INPUTS)
def test_shapes_and_finiteness(feature, dim, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # short inputs must not warn
        f = featurize(INPUTS[kind], feature, dim=dim)
    assert f.shape == (77, dim) and f.dtype == np.float32
    assert np.isfinite(f).all()
    np.testing.assert_array_equal(f, featurize(INPUTS[kind], feature, dim=dim))


@pytest.mark.parametrize("feature", FEATURES)
def test_dispatch(feature):
    function = {"waveform": waveform_features, "fft": fft_features,
                "melspectrogram": melspectrogram_features, "mfcc": mfcc_features}[feature]
    y = INPUTS["noise"]
    np.testing.assert_array_equal(featurize(y, feature, dim=64), function(y, dim=64))


def test_waveform_is_row_major_and_zero_padded():
    y = np.arange(1, 101, dtype=np.float32)
    f = waveform_features(y, dim=8)
    np.testing.assert_array_equal(f[0], y[:8])
    np.testing.assert_array_equal(f.ravel()[:100], y)
    assert not f.ravel()[100:].any()
    long = np.arange(77 * 8 + 50, dtype=np.float32)
    np.testing.assert_array_equal(waveform_features(long, dim=8).ravel(), long[:77 * 8])


def test_fft_of_short_slice_pads_rows():
    f = fft_features(tone(0.01), dim=768)  # 441 samples, hop 6: 1 + 441 // 6 = 74 frames
    assert f[:74].any(axis=1).all()
    assert not f[74:].any()


def test_fft_peak_bin():
    f = fft_features(tone(1.0, frequency=1000.0), dim=768)  # n_fft 1534: bin spacing 28.75 Hz
    assert np.bincount(f.argmax(axis=1)).argmax() == round(1000 / (SAMPLE_RATE / 1534))


def test_melspectrogram_range_and_peak_band():
    f = melspectrogram_features(tone(1.0, frequency=1000.0), dim=64)
    assert f.min() >= 0 and f.max() == pytest.approx(1.0)
    band = np.bincount(f.argmax(axis=1)).argmax()
    import librosa

    edges = librosa.mel_frequencies(64 + 2, fmin=0, fmax=SAMPLE_RATE / 2)
    assert edges[band] < 1000 < edges[band + 2]  # the band whose triangle holds 1 kHz


def test_melspectrogram_of_silence_is_zero():
    assert not melspectrogram_features(np.zeros(5000, np.float32), dim=768).any()
    assert not melspectrogram_features(np.full(5000, 1e-9, np.float32), dim=64).any()


@pytest.mark.parametrize("dim", [1, 32, 64, 128, 768, 1024])
def test_no_empty_mel_filters(dim):
    n_fft, filterbank = _mel_filterbank(dim, SAMPLE_RATE)
    assert filterbank.shape == (dim, n_fft // 2 + 1)
    assert ((filterbank > 0).sum(axis=1) >= 2).all()


def test_mfcc_inverts_to_the_mel_spectrogram():
    """The inverse DCT of the MFCCs is the log mel spectrogram; rescaled, it is the melspectrogram feature."""
    y = load_noise_burst()
    db = scipy.fft.idct(mfcc_features(y, dim=64).astype(np.float64), type=2, norm="ortho", axis=1)
    expected = melspectrogram_features(y, dim=64)
    np.testing.assert_allclose(np.clip((db - db.max() + 80) / 80, 0, 1), expected, atol=1e-4)


def load_noise_burst() -> np.ndarray:
    """Noise with a rising level, long enough for 77 full frames."""
    rng = np.random.default_rng(2)
    return (rng.standard_normal(SAMPLE_RATE) * np.linspace(0.01, 0.5, SAMPLE_RATE)).astype(np.float32)


def test_mfcc_zeroth_coefficient_follows_loudness():
    y = load_noise_burst()
    c0 = mfcc_features(y, dim=32)[:, 0]
    assert c0[-1] > c0[0] and np.corrcoef(c0, np.arange(77))[0, 1] > 0.9


# -- errors

def test_unknown_feature_lists_valid_ones():
    with pytest.raises(ParameterError) as error:
        featurize(INPUTS["noise"], "chroma")
    assert "chroma" in str(error.value) and all(name in str(error.value) for name in FEATURES)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dim", [0, -3, 2.5])
def test_bad_dim(feature, dim):
    with pytest.raises(ParameterError):
        featurize(INPUTS["noise"], feature, dim=dim)


def test_fft_needs_two_columns():
    with pytest.raises(ParameterError, match="dim >= 2"):
        featurize(INPUTS["noise"], "fft", dim=1)


@pytest.mark.parametrize("y", [np.zeros(0, np.float32), np.zeros((2, 100), np.float32),
                               np.array([0.1, np.nan, 0.2], np.float32)])
def test_bad_samples(y):
    with pytest.raises(ParameterError):
        featurize(y, "fft", dim=64)


# -- mel and MFCC features against librosa.feature called independently

def _librosa_parameters(y: np.ndarray, dim: int) -> dict:
    """The STFT parameters the README promises: hop len/77 + 1 and the smallest power-of-two n_fft,
    at least 2048, whose bin spacing is no wider than the narrowest mel band spacing."""
    import librosa

    narrowest = np.diff(librosa.mel_frequencies(dim + 2, fmin=0.0, fmax=SAMPLE_RATE / 2)).min()
    n_fft = 2048
    while SAMPLE_RATE / n_fft > narrowest:
        n_fft *= 2
    return dict(sr=SAMPLE_RATE, n_fft=n_fft, hop_length=len(y) // 77 + 1, n_mels=dim, fmin=0.0,
                fmax=SAMPLE_RATE / 2)


def _real_slice(audio_dir) -> np.ndarray:
    y = load_audio(audio_dir / "Toms_diner.wav")
    return y[SAMPLE_RATE // 2: SAMPLE_RATE // 2 + SAMPLE_RATE // 6]  # one frame at 6 fps


@pytest.mark.parametrize("dim", [64, 768])
def test_melspectrogram_equals_librosa(audio_dir, dim):
    import librosa

    y = _real_slice(audio_dir)
    power = librosa.feature.melspectrogram(y=y, power=2.0, **_librosa_parameters(y, dim))
    db = librosa.power_to_db(power, ref=np.max(power), amin=1e-10, top_db=80.0)
    expected = np.clip((db + 80.0) / 80.0, 0.0, 1.0).T
    ours = melspectrogram_features(y, dim=dim)
    assert_close(ours[: len(expected)], expected[:77])
    assert not ours[len(expected):].any()  # rows past the slice's frames are zero


@pytest.mark.parametrize("dim", [64, 768])
def test_mfcc_equals_librosa(audio_dir, dim):
    import librosa

    y = _real_slice(audio_dir)
    expected = librosa.feature.mfcc(y=y, n_mfcc=dim, **_librosa_parameters(y, dim)).T
    ours = mfcc_features(y, dim=dim)
    assert_close(ours[: len(expected)], expected[:77])
