"""sounddiffusion.model.conditioning: normalization modes, text mixing, prompt files and schedules."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sounddiffusion.control.prompts import parse_prompt_file, prompt_weights_at, start_end_schedule
from sounddiffusion.errors import ParameterError, PromptFileError
from sounddiffusion.model.conditioning import NORMALIZE_MODES, blend_conditionings, condition
from sounddiffusion.sound.features import featurize


@pytest.fixture(scope="module")
def conds(tiny_dir):
    """Real CLIP conditionings of the tiny model (77, 32): a text prompt and the empty prompt."""
    text_cond = load_file(tiny_dir / "golden.safetensors")["text_cond"]
    return text_cond[0], text_cond[1]  # golden.json: prompt 0 is text, prompt 1 is ""


def music(dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(30000).astype(np.float32) * np.linspace(0, 1, 30000, dtype=np.float32)
    return featurize(y, "fft", dim=dim)


def column_stats(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = matrix[1:].double()
    return rows.mean(dim=0), rows.std(dim=0, correction=0)


# -- clip (default)

def test_default_mode_is_clip():
    assert NORMALIZE_MODES[0] == "clip"


@pytest.mark.parametrize("feature", ["waveform", "fft", "melspectrogram", "mfcc"])
def test_clip_matches_empty_prompt_statistics(conds, feature):
    _, empty = conds
    y = np.random.default_rng(3).standard_normal(20000).astype(np.float32)
    result = condition(featurize(y, feature, dim=32), empty_cond=empty)
    assert result.shape == (77, 32) and result.dtype == torch.float32
    torch.testing.assert_close(result[0], empty[0])  # the beginning-of-text row
    for ours, wanted in zip(column_stats(result), column_stats(empty)):
        torch.testing.assert_close(ours, wanted, atol=1e-4, rtol=0)
    assert not torch.allclose(result, empty)  # the sound is in there


def test_clip_keeps_the_shape_of_each_column(conds):
    _, empty = conds
    features = music()
    result = condition(features, empty_cond=empty).double()
    for column in (0, 7, 31):
        correlation = np.corrcoef(features[1:, column], result[1:, column].numpy())[0, 1]
        assert correlation == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("silence", [np.zeros((77, 32), np.float32), np.full((77, 32), 0.5, np.float32)])
def test_clip_constant_features_give_the_empty_prompt(conds, silence):
    _, empty = conds
    result = condition(silence, empty_cond=empty)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, empty)


def test_clip_constant_columns_come_from_the_empty_prompt(conds):
    _, empty = conds
    features = music()
    features[:, 5] = 2.0
    result = condition(features, empty_cond=empty)
    torch.testing.assert_close(result[:, 5], empty[:, 5])
    for ours, wanted in zip(column_stats(result), column_stats(empty)):
        torch.testing.assert_close(ours, wanted, atol=1e-4, rtol=0)


def test_clip_text_mix(conds):
    text, empty = conds
    features = music()
    audio = condition(features, empty_cond=empty)
    torch.testing.assert_close(condition(features, text_cond=text, empty_cond=empty, textstrength=0.0), audio)
    torch.testing.assert_close(condition(features, text_cond=text, empty_cond=empty, textstrength=1.0), text)
    torch.testing.assert_close(condition(features, text_cond=text, empty_cond=empty, textstrength=0.25),
                               0.75 * audio + 0.25 * text)
    torch.testing.assert_close(condition(features, text_cond=text, empty_cond=empty, textstrength=3.0), text)


def test_clip_is_deterministic_and_takes_numpy_or_torch(conds):
    text, empty = conds
    features = music()
    first = condition(features, text_cond=text, empty_cond=empty, textstrength=0.5)
    assert torch.equal(first, condition(features, text_cond=text, empty_cond=empty, textstrength=0.5))
    assert torch.equal(first, condition(torch.from_numpy(features), text_cond=text, empty_cond=empty, textstrength=0.5))


def test_wide_conditioning_statistics():
    """The SD v1 width, with a beginning-of-text row far from the others as in CLIP."""
    generator = torch.Generator().manual_seed(0)
    empty = torch.randn(77, 768, generator=generator) * torch.linspace(0.1, 2, 768) + torch.linspace(-1, 1, 768)
    empty[0] = 30.0
    y = np.random.default_rng(4).standard_normal(44100).astype(np.float32)
    result = condition(featurize(y, "mfcc", dim=768), empty_cond=empty)
    assert torch.equal(result[0], empty[0])
    for ours, wanted in zip(column_stats(result), column_stats(empty)):
        torch.testing.assert_close(ours, wanted, atol=1e-4, rtol=0)


# -- text-range (the original formula)

def original_formula(features: np.ndarray, t: torch.Tensor, s: float) -> torch.Tensor:
    t = t.double().numpy()
    lo, hi = t.min() / s, t.max() / s
    a = (features - features.min()) * (hi - lo) / (features.max() - features.min()) + lo
    return torch.from_numpy(a + t)


@pytest.mark.parametrize("strength", [0.3, 1.0, 4.0])
def test_text_range_is_the_original_formula(conds, strength):
    text, empty = conds
    features = music().astype(np.float64)
    with_text = condition(features, mode="text-range", text_cond=text, empty_cond=empty, textstrength=strength)
    torch.testing.assert_close(with_text.double(), original_formula(features, text, strength), atol=1e-5, rtol=1e-6)
    without = condition(features, mode="text-range", empty_cond=empty, textstrength=strength)
    torch.testing.assert_close(without.double(), original_formula(features, empty, strength), atol=1e-5, rtol=1e-6)


def test_text_range_silence_is_the_middle_of_the_range(conds):
    text, empty = conds
    result = condition(np.zeros((77, 32)), mode="text-range", text_cond=text, empty_cond=empty, textstrength=2.0)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, text + (text.min() + text.max()) / 4)


@pytest.mark.parametrize("strength", [0.0, -1.0, float("nan")])
def test_text_range_needs_positive_strength(conds, strength):
    _, empty = conds
    with pytest.raises(ParameterError, match="textstrength"):
        condition(music(), mode="text-range", empty_cond=empty, textstrength=strength)


# -- none

def test_none_is_raw(conds):
    text, empty = conds
    features = music()
    torch.testing.assert_close(condition(features, mode="none", empty_cond=empty), torch.from_numpy(features))
    torch.testing.assert_close(condition(features, mode="none", text_cond=text, empty_cond=empty),
                               torch.from_numpy(features) + text)


# -- errors and devices

def test_unknown_mode(conds):
    _, empty = conds
    with pytest.raises(ParameterError, match="clip"):
        condition(music(), mode="zscore", empty_cond=empty)


def test_shape_mismatch(conds):
    text, empty = conds
    with pytest.raises(ParameterError, match="dim=32"):
        condition(music(dim=64), empty_cond=empty)
    with pytest.raises(ParameterError):
        condition(music(), text_cond=text[:, :16], empty_cond=empty)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", NORMALIZE_MODES)
def test_result_on_the_conditioning_device(conds, mode):
    text, empty = conds
    on_cpu = condition(music(), mode=mode, text_cond=text, empty_cond=empty)
    on_gpu = condition(music(), mode=mode, text_cond=text.cuda(), empty_cond=empty.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)


# -- prompt files

def write(tmp_path, text: str):
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_time_format(tmp_path):
    path = write(tmp_path, "\n".join([
        "# a storm that clears",
        "0:05 a dark sea",
        "",
        "0:07.5 lightning over the waves",
        "   9.25   rain, heavy rain  ",
        "12 the clouds break",
        "0:20: a rainbow",
        "1:02:03 a sunny beach",
        "75:00 night",
    ]))
    assert parse_prompt_file(path) == [
        (5.0, "a dark sea"), (7.5, "lightning over the waves"), (9.25, "rain, heavy rain"),
        (12.0, "the clouds break"), (20.0, "a rainbow"), (3723.0, "a sunny beach"), (4500.0, "night"),
    ]


@pytest.mark.parametrize(("lines", "bad_line"), [
    (["0:00 start", "0:10 middle", "later on: no time"], 3),
    (["# comment", "", "0:60 too many seconds"], 3),
    (["0:05 ok", "1:75:00 minutes out of range"], 2),
    (["0:05 ok", "0:10"], 2),
    (["0:05 ok", "0:10 more", "0:10 same time"], 3),
    (["0:30 later", "0:20 earlier"], 2),
    (["1,5 comma"], 1),
])
def test_bad_lines_are_named(tmp_path, lines, bad_line):
    path = write(tmp_path, "\n".join(lines))
    with pytest.raises(PromptFileError) as error:
        parse_prompt_file(path)
    message = str(error.value)
    assert str(path) in message and f"line {bad_line}:" in message and "\n" not in message


def test_a_byte_order_mark_is_read(tmp_path):
    # Windows editors (Notepad's "UTF-8 with BOM") start the file with EF BB BF: it was "cannot read"
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf0:00 a dark sea\r\n0:05 caf\xc3\xa9 at dawn\r\n")
    assert parse_prompt_file(path) == [(0.0, "a dark sea"), (5.0, "caf\u00e9 at dawn")]


@pytest.mark.parametrize(("time", "shown"), [
    ("9" * 5000 + ":00:00", "99999999...99:00:00 (5006 characters)"),  # int() refused > 4,300 digits
    ("1" + "0" * 400, "10000000...00000000 (401 characters)"),            # float() made it inf
    ("0:" + "1" * 30 + ":00", "0:111111...11111:00 (35 characters)"),
    ("277:46:41", "277:46:41"),                                            # 1,000,001 s
    ("16667:00", "16667:00"),                                              # 1,000,020 s
])
def test_times_past_the_latest_are_one_line(tmp_path, time, shown):
    path = write(tmp_path, f"0:00 start\n{time} much later\n")
    with pytest.raises(PromptFileError) as error:
        parse_prompt_file(path)
    assert str(error.value) == (f"{path}, line 2: time {shown} is later than 1000000 s (about 278 hours), "
                                f"the latest a prompt file takes; check the time")


def test_the_latest_time_and_leading_zeros_are_read(tmp_path):
    path = write(tmp_path, "0:00 start\n277:46:40 the end\n")
    assert parse_prompt_file(path)[-1] == (1_000_000.0, "the end")
    path = write(tmp_path, "0:00 start\n" + "0" * 5000 + "5 padded\n")
    assert parse_prompt_file(path)[-1] == (5.0, "padded")


@pytest.mark.parametrize("line", ["\u0661:00 Arabic-Indic digits", "\uff11\uff12 fullwidth digits"])
def test_times_in_other_digits_are_not_read(tmp_path, line):
    # float() and int() read them; the prompt file format is ASCII digits, as schedules are
    with pytest.raises(PromptFileError, match="line 2: cannot read"):
        parse_prompt_file(write(tmp_path, f"0:00 start\n{line}\n"))


def test_a_long_bad_line_is_shown_shortened(tmp_path):
    path = write(tmp_path, "soon " + "a very long prompt " * 400 + "\n")
    with pytest.raises(PromptFileError) as error:
        parse_prompt_file(path)
    assert len(str(error.value)) < 400 + len(str(path)) and "cannot read 'soon a very long" in str(error.value)


def test_bad_format_message_shows_the_format(tmp_path):
    with pytest.raises(PromptFileError, match="M:SS"):
        parse_prompt_file(write(tmp_path, "soon a cat\n"))


def test_prompt_file_problems(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        parse_prompt_file(tmp_path / "missing.txt")
    with pytest.raises(PromptFileError, match="folder"):
        parse_prompt_file(tmp_path)
    with pytest.raises(PromptFileError, match="no prompt"):
        parse_prompt_file(write(tmp_path, "# only a comment\n\n"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("0:00 café\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="UTF-8"):
        parse_prompt_file(latin1)


# -- schedules

SCHEDULE = [(2.0, "a"), (4.0, "b"), (8.0, "c")]


@pytest.mark.parametrize(("t", "expected"), [
    (0.0, [("a", 1.0)]),
    (2.0, [("a", 1.0)]),
    (3.0, [("a", 0.5), ("b", 0.5)]),
    (3.5, [("a", 0.25), ("b", 0.75)]),
    (4.0, [("b", 1.0)]),
    (7.0, [("b", 0.25), ("c", 0.75)]),
    (8.0, [("c", 1.0)]),
    (100.0, [("c", 1.0)]),
])
def test_prompt_weights(t, expected):
    weights = prompt_weights_at(SCHEDULE, t)
    assert [p for p, _ in weights] == [p for p, _ in expected]
    assert [w for _, w in weights] == pytest.approx([w for _, w in expected])


def test_single_prompt_and_empty_schedule():
    assert prompt_weights_at([(5.0, "x")], 0.0) == [("x", 1.0)]
    assert prompt_weights_at([(5.0, "x")], 9.0) == [("x", 1.0)]
    with pytest.raises(ParameterError):
        prompt_weights_at([], 1.0)


def test_start_end_schedule():
    schedule = start_end_schedule("dawn", "dusk", 10.0)
    assert schedule == [(0.0, "dawn"), (10.0, "dusk")]
    assert prompt_weights_at(schedule, 2.5) == [("dawn", 0.75), ("dusk", 0.25)]
    assert prompt_weights_at(schedule, 10.0) == [("dusk", 1.0)]
    assert start_end_schedule("dawn", None, 10.0) == [(0.0, "dawn")]
    assert start_end_schedule("dawn", "dusk", 0.0) == [(0.0, "dawn")]


def test_blend_calls_each_prompt_once():
    calls = []
    table = {"a": torch.full((77, 4), 1.0), "b": torch.full((77, 4), 3.0)}

    def cond_of(prompt):
        calls.append(prompt)
        return table[prompt]

    blended = blend_conditionings([("a", 0.25), ("b", 0.5), ("a", 0.25)], cond_of)
    torch.testing.assert_close(blended, torch.full((77, 4), 2.0))
    assert sorted(calls) == ["a", "b"]
    with pytest.raises(ParameterError):
        blend_conditionings([], cond_of)


def test_blend_along_a_schedule(conds):
    text, empty = conds
    table = {"text": text, "": empty}
    schedule = start_end_schedule("text", "", 4.0)
    torch.testing.assert_close(blend_conditionings(prompt_weights_at(schedule, 1.0), table.__getitem__),
                               0.75 * text + 0.25 * empty)


def test_non_finite_features(conds):
    _, empty = conds
    features = music()
    features[3, 4] = np.nan
    with pytest.raises(ParameterError, match="NaN"):
        condition(features, empty_cond=empty)
