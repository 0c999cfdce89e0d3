"""``--lora PATH[:WEIGHT]`` as the command lines read it, and every bad LoRA input through the real entry
points: one line on stderr, exit status 2, before anything is rendered (and, for what needs no model,
before the model loads). Renders with LoRAs: tests/test_lora_render.py."""

import pytest
import torch

import ldm.util
from cli_checks import DEMO, TINY, assert_one_line_error, write_sound
from lora_makers import kohya, random_pair, save
from malicious_pickles import PAYLOADS
from sounddiffusion.errors import ParameterError, ScheduleError
from sounddiffusion.model import loading
from sounddiffusion.model.lora_specs import parse_lora_spec

# tiny-v1's cross-attention keys of its first level: Linear(32 -> 32); its text encoder is 32 wide.
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TEXT_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture
def lora(tmp_path):
    return save(tmp_path / "style.safetensors", {**kohya(TO_K, *random_pair(32, 32, 4)),
                                                 **kohya(TEXT_Q, *random_pair(32, 32, 4, seed=1))})


# ----------------------------------------------------------------------------- PATH[:WEIGHT]

@pytest.mark.parametrize("suffix,schedules,weight,constant", [
    ("", False, "1.0", 1.0),
    (":0.8", False, "0.8", 0.8),
    (":-1.5", False, "-1.5", -1.5),
    (":1e-1", False, "1e-1", 0.1),
    (":0.2 + 0.8*low", True, "0.2 + 0.8*low", None),
    (":0:(0.2), 8:(1)", True, "0:(0.2), 8:(1)", None),   # keyframes hold colons themselves
    (":0:0.2, 8:1", True, "0:0.2, 8:1", None),           # ... and may end in a plain number
    (":0.5", True, "0.5", 0.5),
])
def test_the_weight_follows_the_colon_after_the_path(lora, suffix, schedules, weight, constant):
    spec = parse_lora_spec(f"{lora}{suffix}", schedules=schedules)
    assert (spec.path, spec.weight, spec.constant) == (lora, weight, constant)


def test_paths_with_colons_and_drive_letters(tmp_path, monkeypatch, lora):
    monkeypatch.chdir(tmp_path)
    drive = tmp_path / "C:\\loras"   # a Windows path as a POSIX file name: C:\loras\style.safetensors
    drive.mkdir()
    windows = save(drive / "style.safetensors", kohya(TO_K, *random_pair(32, 32, 4)))
    text = str(windows.relative_to(tmp_path))
    assert text.startswith("C:\\loras")
    assert parse_lora_spec(text).weight == "1.0"
    spec = parse_lora_spec(f"{text}:0.7", schedules=True)
    assert (str(spec.path), spec.constant) == (text, 0.7)
    colon = tmp_path / "v1:anime.safetensors"
    colon.write_bytes(lora.read_bytes())
    assert parse_lora_spec(str(colon)).path == colon   # a whole text that names a file is the file
    assert (parse_lora_spec(f"{colon}:-0.25").path, parse_lora_spec(f"{colon}:-0.25").constant) == (colon, -0.25)


@pytest.mark.parametrize("weight,schedules,error,words", [
    ("abc", False, ParameterError, ["not a number", "style.safetensors:0.8"]),
    ("0.2 + 0.8*low", False, ParameterError, ["not a number", "audio2video"]),
    ("inf", False, ParameterError, ["not a number"]),
    ("0.2 +* low", True, ScheduleError, ["--lora", "column 6"]),
    ("0.2 + 0.8*lows", True, ScheduleError, ["--lora", "lows"]),
])
def test_a_weight_that_does_not_read_is_one_line(lora, weight, schedules, error, words):
    with pytest.raises(error) as caught:
        parse_lora_spec(f"{lora}:{weight}", schedules=schedules)
    message = str(caught.value)
    assert "\n" not in message and str(lora) in message
    for word in words:
        assert word in message, (word, message)


# ----------------------------------------------------------------------------- through the entry points

@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: mistakes in the flags must be found before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")
    monkeypatch.setattr(ldm.util, "load_model_from_config", refuse)
    monkeypatch.setattr(loading, "build_demo_model", refuse)


def tool_args(tool, tmp_path, sound):
    """A quick run of ``tool`` on the tiny model, output under tmp_path/out."""
    out = tmp_path / "out"
    return {"txt2img": ["--outdir", out, *TINY],
            "audio2img": ["--audio", sound, "--outdir", out, *TINY],
            "audio2video": ["--path", sound, "--fps", 2, "--output", out / "v.mp4", *TINY]}[tool]


@pytest.fixture
def sound(tmp_path):
    return write_sound(tmp_path / "tone.wav", seconds=1.0)


def made_nothing(tmp_path) -> bool:
    out = tmp_path / "out"
    return not out.exists() or not any(p.is_file() for p in out.rglob("*"))


@pytest.mark.parametrize("tool", ["txt2img", "audio2img", "audio2video"])
def test_missing_file_and_bad_weights_fail_before_the_model_loads(run_tool, tmp_path, sound, lora, no_model_load,
                                                                  tool):
    args = tool_args(tool, tmp_path, sound)
    for spec, words in [(tmp_path / "nope.safetensors", ["nope.safetensors", "does not exist"]),
                        (f"{tmp_path / 'nope.safetensors'}:0.5", ["nope.safetensors", "does not exist"]),
                        (tmp_path, ["folder"]),
                        (f"{lora}:strong", ["not a number"] if tool != "audio2video" else ["unknown name 'strong'"]),
                        (f"{lora}:0.2 +* low", ["not a number"] if tool != "audio2video" else ["column 6"])]:
        status, _, err = run_tool(tool, [*args, "--lora", lora, "--lora", spec])
        assert_one_line_error(status, err, tool, *words)
    assert made_nothing(tmp_path)


@pytest.mark.parametrize("content,words", [
    (b"just some text, not a LoRA\n", ["neither", "LoRA .safetensors"]),
    ("checkpoint", ["is not a LoRA", "checkpoint"]),
    ("sdxl", ["SDXL"]),
    ("loha", ["LoHa", "LoRA or LoCon"]),
])
def test_files_that_are_no_usable_lora_fail_before_the_model_loads(run_tool, tmp_path, no_model_load, content,
                                                                   words):
    path = tmp_path / "style.safetensors"
    if content == "checkpoint":
        save(path, {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)})
    elif content == "sdxl":
        save(path, kohya("lora_te2_text_model_encoder_layers_0_mlp_fc1", *random_pair(5120, 1280, 2)))
    elif content == "loha":
        save(path, {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)})
    else:
        path.write_bytes(content)
    status, _, err = run_tool("txt2img", ["--outdir", tmp_path / "out", *TINY, "--lora", path])
    assert_one_line_error(status, err, "txt2img", str(path), *words)
    assert made_nothing(tmp_path)


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_a_pickled_lora_that_would_run_code_is_one_line_and_never_runs(run_tool, tmp_path, no_model_load, payload):
    marker, path = tmp_path / "pwned", tmp_path / "style.pt"
    torch.save({**kohya(TO_K, *random_pair(32, 32, 4)), "hook": payload(marker)}, path)
    status, _, err = run_tool("txt2img", ["--outdir", tmp_path / "out", *TINY, "--lora", path])
    assert_one_line_error(status, err, "txt2img", str(path), "unsafe")
    assert not marker.exists() and made_nothing(tmp_path)


@pytest.mark.parametrize("tool", ["txt2img", "audio2video"])
def test_a_lora_for_another_family_or_no_layer_is_one_line_before_rendering(run_tool, tmp_path, sound, tool):
    args = tool_args(tool, tmp_path, sound)
    sd2 = save(tmp_path / "sd2.safetensors", kohya(TO_K, *random_pair(32, 1024, 4)))  # 1024-wide context: SD 2.x
    status, _, err = run_tool(tool, [*args, "--lora", sd2])
    assert_one_line_error(status, err, tool, str(sd2), "is for SD 2.x", "use a LoRA made for SD v1")
    nothing = save(tmp_path / "other.safetensors", kohya("lora_unet_some_other_model_layer", *random_pair(8, 8, 2)))
    status, _, err = run_tool(tool, [*args, "--lora", nothing])
    assert_one_line_error(status, err, tool, str(nothing), "fits no layer")
    assert made_nothing(tmp_path)


def test_a_real_sd_v1_lora_on_the_demo_model_says_it_needs_real_weights(run_tool, tmp_path):
    v1 = save(tmp_path / "anime.safetensors", kohya(TO_K.replace("down_blocks_0", "down_blocks_1"),
                                                    *random_pair(640, 768, 4)))
    status, _, err = run_tool("txt2img", ["--outdir", tmp_path / "out", *DEMO, "--lora", v1])
    assert_one_line_error(status, err, "txt2img", str(v1), "is for SD v1", "--demo model", "--ckpt")


def test_keys_matching_nothing_are_one_warning_with_the_count_and_debug_lists_them(run_tool, tmp_path, lora):
    path = save(tmp_path / "partly.safetensors", {**kohya(TO_K, *random_pair(32, 32, 4)),
                                                  **kohya("lora_unet_not_a_layer_here", *random_pair(8, 8, 2))})
    status, _, err = run_tool("txt2img", ["--outdir", tmp_path / "out", *TINY, "--lora", path])
    assert status == 0, err
    warnings = [line for line in err.splitlines() if "match no layer" in line]
    assert len(warnings) == 1 and "1 of its 2 modules" in warnings[0], err
    assert "lora_unet_not_a_layer_here" not in err
    status, out, err = run_tool("txt2img", ["--outdir", tmp_path / "out", *TINY, "--lora", path, "--debug"])
    assert status == 0 and "lora_unet_not_a_layer_here" in out + err


def test_help_says_where_the_weight_goes(run_tool):
    _, out, _ = run_tool("audio2video", ["--help"])
    flat = " ".join(out.split())
    assert "--lora PATH[:WEIGHT]" in flat and "default 1.0, negative allowed" in flat and "0.2 + 0.8*low" in flat
    _, out, _ = run_tool("txt2img", ["--help"])
    assert "--lora PATH[:WEIGHT]" in out and "0.8*low" not in out and "--negative_prompt" in out


def test_each_lora_file_is_hashed_once_before_a_render(lora, monkeypatch):
    """--lora is parsed once (the file read, checked and hashed); the run's record and the merge
    reuse those hashes, and only the merge reads the tensors again."""
    from sounddiffusion.model import lora as lora_module
    from sounddiffusion.model import lora_files, lora_specs
    from sounddiffusion.model.lora_specs import parse_lora_specs
    from sounddiffusion.settings import ModelSettings

    calls = {"hash": 0, "read": 0}

    def counted(kind, function):
        def call(*args, **kwargs):
            calls[kind] += 1
            return function(*args, **kwargs)
        return call
    for module in (lora_files, lora_specs, lora_module):  # wherever the names are bound
        if hasattr(module, "file_hashes"):
            monkeypatch.setattr(module, "file_hashes", counted("hash", lora_files.file_hashes))
    monkeypatch.setattr(lora_files, "read_state_dict", counted("read", lora_files.read_state_dict))
    model = ModelSettings(config=TINY[1], ckpt=TINY[3], device="cpu", lora=(f"{lora}:0.5*low",))
    specs = parse_lora_specs(model.lora, schedules=True)
    record = loading.model_record(model, specs)
    engine = loading.load_engine(model, loras=specs)
    assert calls == {"hash": 1, "read": 2}
    assert record["lora"] == engine.loras and engine.loras[0]["short_hash"] == specs[0].info.short_hash
