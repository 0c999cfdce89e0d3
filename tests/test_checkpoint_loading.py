"""Checkpoint reading (ldm.checkpoint) and strict loading (ldm.util.load_model_from_config):
pickles that would run code are refused before anything runs, broken files give a clear
CheckpointError, keys and shapes are checked strictly, and the real SD v1 layout loads fully."""
import json
import logging
import pickle

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import ldm.checkpoint
from ldm.checkpoint import fit_state_dict, read_state_dict
from ldm.util import CheckpointError, UnsafeCheckpointError, load_model_from_config
from malicious_pickles import PAYLOADS

REPO_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
TEXT = "cond_stage_model.transformer."


def text_cond_error(model, golden, prompts):
    """Largest deviation of the model's conditioning of the golden prompts from the reference."""
    with torch.no_grad():
        cond = model.get_learned_conditioning(prompts)
    return float((cond - golden["text_cond"]).abs().max())


# ------------------------------------------------------------------------------ code in pickles

class Recorder:
    """A class this test module defines: were the loader to import and call it, the marker appears."""

    def __init__(self, marker):
        open(marker, "w").close()

    def __setstate__(self, state):
        open(state["marker"], "w").close()

    def __reduce__(self):
        return Recorder, (self.marker,), {"marker": self.marker}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_pickle_that_would_run_code_is_refused_before_it_runs(payload, zip_format, tiny_sd, tiny_dir, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_sd, "callbacks": payload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_model_from_config(tiny_dir / "config.yaml", path, device="cpu")
    message = str(refused.value)
    assert str(path) in message and ("system" in message or "exec" in message) and "safetensors" in message
    assert not marker.exists()


def test_unknown_classes_become_inert_placeholders(tiny_sd, tmp_path):
    marker = tmp_path / "called"
    recorder = Recorder.__new__(Recorder)
    recorder.marker = str(marker)
    path = tmp_path / "with-objects.ckpt"
    torch.save({"state_dict": tiny_sd, "hparams": recorder}, path)
    assert read_state_dict(path).keys() == tiny_sd.keys()
    assert not marker.exists()

    with open(path, "wb") as f:
        pickle.dump({"hparams": recorder}, f, protocol=2)
    with open(path, "rb") as f:
        loaded = ldm.checkpoint.RestrictedUnpickler(f).load()["hparams"]
    assert isinstance(loaded, ldm.checkpoint.PickledObject)
    assert loaded.pickled_global.endswith("Recorder") and loaded.args == (str(marker),)
    assert loaded.state == {"marker": str(marker)}
    assert not marker.exists()


# ------------------------------------------------------------------------------ broken files

def test_legacy_torch_format_is_read(tiny_sd, tmp_path):
    path = tmp_path / "old.pt"
    torch.save(tiny_sd, path, _use_new_zipfile_serialization=False)  # a bare state dict, pre-1.6 format
    loaded = read_state_dict(path)
    assert loaded.keys() == tiny_sd.keys()
    assert all(torch.equal(loaded[k], tiny_sd[k]) for k in tiny_sd)


@pytest.mark.parametrize("keep", [0.5, 0.001])
@pytest.mark.parametrize("kind", ["ckpt", "safetensors"])
def test_truncated_file_is_a_checkpoint_error(kind, keep, tiny_sd, tmp_path):
    whole = tmp_path / f"whole.{kind}"
    if kind == "ckpt":
        torch.save({"state_dict": tiny_sd}, whole)
    else:
        save_file(tiny_sd, whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated") as error:
        read_state_dict(cut)
    assert str(cut) in str(error.value) and "download it again" in str(error.value)


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ("dir", "is a directory"),
    (b"", "is empty"),
    (b"model: {target: x}\n", "neither a torch checkpoint nor a safetensors file"),
    ({"epoch": 3}, "holds no state dict"),
    ([1, 2, 3], "holds no state dict"),
])
def test_unusable_file_is_a_checkpoint_error_naming_it(content, expected, tmp_path):
    path = tmp_path / "model.ckpt"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=expected) as error:
        read_state_dict(path)
    assert str(path) in str(error.value)


# ------------------------------------------------------------------------------ keys and shapes

def test_missing_weights_name_keys_and_both_files(tiny_sd, tiny_dir, tmp_path, caplog):
    config = tiny_dir / "config.yaml"
    dropped = ["model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.bias"]
    path = tmp_path / "incomplete.safetensors"
    save_file({k: v for k, v in tiny_sd.items() if k not in dropped}, path)
    with caplog.at_level(logging.DEBUG, logger="ldm"), pytest.raises(CheckpointError) as error:
        load_model_from_config(config, path, device="cpu")
    message = str(error.value)
    assert str(path) in message and str(config) in message
    # One example in the one-line message, every key at debug level (--debug).
    assert "2 weights missing such as " in message and any(k in message for k in dropped)
    assert all(k in caplog.text for k in dropped)


def test_weights_of_another_width_name_shapes_and_both_files(tiny_dir, tmp_path):
    config = OmegaConf.load(tiny_dir / "config.yaml")
    config.model.params.unet_config.params.model_channels = 64
    config_path = tmp_path / "wide.yaml"
    OmegaConf.save(config, config_path)
    with pytest.raises(CheckpointError, match="of another shape") as error:
        load_model_from_config(config_path, tiny_dir / "model.safetensors", device="cpu")
    message = str(error.value)
    assert str(tiny_dir / "model.safetensors") in message and str(config_path) in message
    assert "model.diffusion_model." in message and "file (32," in message and "vs model (64," in message
    assert "pass the config made for this checkpoint with --config" in message


def test_config_without_a_path_is_called_the_config(tiny_sd, tiny_dir, tmp_path):
    path = tmp_path / "incomplete.safetensors"
    save_file({k: v for k, v in tiny_sd.items() if "decoder" not in k}, path)
    with pytest.raises(CheckpointError, match="does not fit the config: "):
        load_model_from_config(OmegaConf.load(tiny_dir / "config.yaml"), path, device="cpu")


def test_unexpected_keys_are_a_warning(tiny_sd, tiny_dir, tmp_path, caplog, golden, prompts):
    path = tmp_path / "extra.safetensors"
    save_file({**tiny_sd, "lora.extra.weight": torch.zeros(3)}, path)
    with caplog.at_level(logging.WARNING, logger="ldm.checkpoint"):
        model = load_model_from_config(tiny_dir / "config.yaml", path, device="cpu")
    assert "lora.extra.weight" in caplog.text
    assert text_cond_error(model, golden, prompts) < 1e-4


@pytest.mark.parametrize("layout", ["without text_model.", "without position_ids"])
def test_text_tower_layouts_load(layout, tiny_sd, tiny_dir, tmp_path, golden, prompts, caplog):
    if layout == "without text_model.":
        sd = {k.replace(TEXT + "text_model.", TEXT): v for k, v in tiny_sd.items()}
    else:
        sd = {k: v for k, v in tiny_sd.items() if not k.endswith("position_ids")}
    assert sd.keys() != tiny_sd.keys()
    path = tmp_path / "layout.safetensors"
    save_file(sd, path)
    with caplog.at_level(logging.WARNING):
        model = load_model_from_config(tiny_dir / "config.yaml", path, device="cpu")
    assert text_cond_error(model, golden, prompts) < 1e-4
    assert "does not use" not in caplog.text


def test_text_keys_follow_the_models_layout_either_way():
    weight = torch.zeros(2, 2)
    for model_key, file_key in [(TEXT + "text_model.final_layer_norm.weight", TEXT + "final_layer_norm.weight"),
                                (TEXT + "final_layer_norm.weight", TEXT + "text_model.final_layer_norm.weight")]:
        fitted = fit_state_dict({file_key: weight}, {model_key: weight}, "file.ckpt")
        assert list(fitted) == [model_key]


def test_ema_weights_are_used_only_with_use_ema(tiny_sd, tiny_dir, tmp_path):
    config = OmegaConf.load(tiny_dir / "config.yaml")
    assert "model_ema.decay" in tiny_sd  # a pruned file: EMA counters only
    config.model.params.use_ema = True
    ema_config = tmp_path / "ema.yaml"
    OmegaConf.save(config, ema_config)
    with pytest.raises(CheckpointError, match="weights missing such as model_ema."):
        load_model_from_config(ema_config, tiny_dir / "model.safetensors", device="cpu")

    # a full file: EMA copies of the UNet weights (here: the weights plus one)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1
           for k, v in tiny_sd.items() if k.startswith("model.diffusion_model.")}
    path = tmp_path / "with-ema.safetensors"
    save_file({**tiny_sd, **ema}, path)
    model = load_model_from_config(ema_config, path, device="cpu")
    shadow = dict(model.model_ema.named_buffers())
    assert all(torch.equal(shadow[k[len("model_ema."):]], v.float()) for k, v in ema.items())

    model = load_model_from_config(tiny_dir / "config.yaml", path, device="cpu")  # use_ema: False
    assert not hasattr(model, "model_ema")
    weight = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[weight], tiny_sd[weight].float())


# ------------------------------------------------------------------------------ full size

@pytest.mark.slow
def test_full_size_sd_v1_layout_lands_in_every_parameter(reference_dir, monkeypatch):
    """The v1-inference.yaml model takes a state dict with exactly the keys and shapes of real SD v1
    files: none missing, each tensor in its own parameter. Each file tensor is a constant (its index
    + 1, exact in float16) expanded to its shape, so the state dict costs no memory; the reader is
    replaced by one returning it (file reading is covered by the tiny model's tests)."""
    manifest = json.loads((reference_dir / "sd-v1-keys.json").read_text())
    weights = sorted(manifest["keys"].items())
    state_dict = {k: torch.tensor(i + 1.0, dtype=torch.float16).expand(shape) for i, (k, shape) in enumerate(weights)}
    for j, (k, shape) in enumerate(sorted(manifest["optional"].items())):
        if k.endswith("position_ids"):
            state_dict[k] = torch.arange(77)[None]
        elif k == "model_ema.num_updates":
            state_dict[k] = torch.tensor(0, dtype=torch.int32)
        else:  # the noise schedule and model_ema.decay
            state_dict[k] = torch.full(shape, -(j + 1.0))
    monkeypatch.setattr(ldm.checkpoint, "read_state_dict", lambda path: state_dict)

    model = load_model_from_config(REPO_CONFIG, "sd-v1-layout.ckpt", device="cpu")
    got = model.state_dict()
    layout = {k.replace(TEXT + "text_model.", TEXT): k for k in got}
    wrong = []
    for i, (key, _) in enumerate(weights):
        tensor = got[layout[key.replace(TEXT + "text_model.", TEXT)]]
        if not (float(tensor.min()) == float(tensor.max()) == i + 1):
            wrong.append(key)
    assert not wrong, f"{len(wrong)} weights hold other values: {wrong[:5]}"
    assert float(got["alphas_cumprod"].min()) < 0  # the schedule buffers load too
    floating = {k for k, v in got.items() if v.is_floating_point() and not k.startswith("model_ema.")}
    assert len(floating) == len(weights) + 12  # every model weight came from the file (+ 12 schedule buffers)


# ------------------------------------------------------------------------------ meta-device build

def test_model_is_built_on_meta_and_computed_buffers_get_values(tiny_sd, tiny_dir, tmp_path, golden, prompts):
    """A file without the schedule buffers and position_ids: the loaded model holds no meta tensor,
    its schedule equals the reference one, position_ids is arange, torch.nn.init stays untouched."""
    init_functions = dict(vars(torch.nn.init))
    sd = {k: v for k, v in tiny_sd.items() if k != "alphas_cumprod" and not k.endswith("position_ids")
          and k not in ("betas", "sqrt_alphas_cumprod")}
    path = tmp_path / "no-buffers.safetensors"
    save_file(sd, path)
    model = load_model_from_config(tiny_dir / "config.yaml", path, device="cpu")
    assert dict(vars(torch.nn.init)) == init_functions
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    torch.testing.assert_close(model.alphas_cumprod, golden["alphas_cumprod"].float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(model.sqrt_alphas_cumprod, golden["alphas_cumprod"].float().sqrt(), rtol=1e-6, atol=0)
    position_ids = [t for n, t in model.named_buffers() if n.endswith("position_ids")]
    assert len(position_ids) == 1 and torch.equal(position_ids[0].reshape(-1), torch.arange(77))
    assert text_cond_error(model, golden, prompts) < 1e-4
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float16 file, float32 model


def test_schedule_stored_in_the_file_is_the_one_used(tiny_sd, tiny_dir, tmp_path):
    """As upstream (load_state_dict after __init__), buffers the file holds win over computed ones."""
    path = tmp_path / "odd-schedule.safetensors"
    save_file({**tiny_sd, "betas": torch.full((1000,), 0.5)}, path)
    model = load_model_from_config(tiny_dir / "config.yaml", path, device="cpu")
    assert torch.equal(model.betas, torch.full((1000,), 0.5))


def test_a_tensor_nothing_fills_is_a_checkpoint_error():
    from ldm.util import fill_computed_buffers

    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
    module.register_buffer("table", torch.zeros(3, device="meta"))
    module.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.ones(2)}, strict=False, assign=True)
    with pytest.raises(CheckpointError, match="1 tensors of the model got no value \\(table\\)"):
        fill_computed_buffers(module)
