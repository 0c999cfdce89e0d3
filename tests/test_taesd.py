"""TAESD (ldm.models.taesd) against diffusers' AutoencoderTiny driven with the same random weights,
in the conventions of a Stable Diffusion pipeline (UNet latents, pictures in [-1, 1]); both file
layouts; hand-made weights whose outputs are known; files that are not TAESD for SD v1/2."""
import json

import pytest
import torch
from safetensors.torch import save_file

from ldm.errors import CheckpointError, UnsafeCheckpointError
from ldm.models.taesd import TinyAutoencoder, decode_seconds, load_taesd
from malicious_pickles import PAYLOADS

diffusers = pytest.importorskip("diffusers", reason="the reference implementation: pip install -r requirements-dev.txt")


def random_state_dict(reference: torch.nn.Module, seed: int = 0) -> dict:
    """Random values for every tensor of ``reference``: weights ~ N(0, 2 / fan-in) (signals keep
    their size through the ReLUs), biases ~ N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in reference.state_dict().items():
        if tensor.ndim > 1:
            state[key] = torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5
        else:
            state[key] = 0.1 * torch.randn(tensor.shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def reference():
    """diffusers' AutoencoderTiny with default (SD v1/2 TAESD) config and random weights."""
    vae = diffusers.AutoencoderTiny().eval()
    vae.load_state_dict(random_state_dict(vae))
    return vae


def original_layout(diffusers_state: dict) -> tuple[dict, dict]:
    """madebyollin/taesd's (encoder, decoder) state dicts from diffusers' keys: the same Sequential
    indices, except that the original decoder starts with a parameter-free Clamp (index + 1)."""
    encoder, decoder = {}, {}
    for key, tensor in diffusers_state.items():
        half, _, rest = key.partition(".layers.")
        index, _, name = rest.partition(".")
        if half == "encoder":
            encoder[f"{index}.{name}"] = tensor.clone()
        else:
            decoder[f"{int(index) + 1}.{name}"] = tensor.clone()
    return encoder, decoder


@pytest.fixture(scope="module")
def taesd_files(reference, tmp_path_factory):
    """The reference's weights as the layouts load_taesd reads, by name."""
    root = tmp_path_factory.mktemp("taesd-files")
    reference.save_pretrained(root / "diffusers")
    encoder, decoder = original_layout(reference.state_dict())
    (root / "pth").mkdir()
    torch.save(encoder, root / "pth" / "taesd_encoder.pth")
    torch.save(decoder, root / "pth" / "taesd_decoder.pth")
    (root / "st").mkdir()
    save_file(encoder, root / "st" / "taesd_encoder.safetensors")
    save_file(decoder, root / "st" / "taesd_decoder.safetensors")
    return {"diffusers folder": root / "diffusers",
            "diffusers file": root / "diffusers" / "diffusion_pytorch_model.safetensors",
            "pth folder": root / "pth", "safetensors folder": root / "st"}


def pictures(seed=1, size=(40, 56)):
    """Pictures in the project's [-1, 1] (diffusers' VaeImageProcessor.normalize of [0, 1] pixels)."""
    pixels = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(seed))
    return diffusers.image_processor.VaeImageProcessor.normalize(pixels)


def unet_latents(seed=2, size=(5, 7)):
    """Latents as the UNet sees them (std ~ 1), some beyond TAESD's soft clamp at +-3."""
    return 1.5 * torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(seed))


def relative_error(ours, theirs):
    return float((ours - theirs).abs().max() / theirs.abs().max())


# -------------------------------------------------------------------- against diffusers

def test_decode_is_what_a_diffusers_pipeline_does_with_the_unet_latents(reference, taesd_files):
    taesd = load_taesd(taesd_files["diffusers folder"])
    latents = unet_latents()
    with torch.no_grad():
        # StableDiffusionPipeline: image = vae.decode(latents / vae.config.scaling_factor).sample, in [-1, 1]
        expected = reference.decode(latents / reference.config.scaling_factor).sample
        got = taesd.decode(latents)
    assert got.shape == (2, 3, 40, 56)
    assert expected.abs().max() > 0.5  # the random weights give a real signal
    assert relative_error(got, expected) < 1e-5


def test_encode_is_what_a_diffusers_img2img_pipeline_gives_the_unet(reference, taesd_files):
    taesd = load_taesd(taesd_files["diffusers folder"])
    images = pictures()
    with torch.no_grad():
        # StableDiffusionImg2ImgPipeline: latents = vae.config.scaling_factor * vae.encode(image).latents
        expected = reference.config.scaling_factor * reference.encode(images).latents
        got = taesd.encode(images)
    assert got.shape == (2, 4, 5, 7)
    assert expected.abs().max() > 0.5
    assert relative_error(got, expected) < 1e-5


def test_a_config_with_a_scale_factor_is_refused(taesd_files, tmp_path):
    """TAESD works on the UNet's (already scaled) latents, so decode applies no scale factor: an
    AutoencoderTiny config asking for one (SD's KL 0.18215, or a shift) is another autoencoder."""
    config = json.loads((taesd_files["diffusers folder"] / "config.json").read_text())
    for key, value in (("scaling_factor", 0.18215), ("shift_factor", 0.1159)):
        folder = tmp_path / key
        folder.mkdir()
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(taesd_files["diffusers file"].read_bytes())
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=f"another tiny autoencoder.*{key}={value}"):
            load_taesd(folder)


@pytest.mark.parametrize("layout", ["diffusers file", "pth folder", "safetensors folder"])
def test_every_file_layout_loads_the_same_numbers(layout, taesd_files):
    baseline = load_taesd(taesd_files["diffusers folder"])
    taesd = load_taesd(taesd_files[layout])
    images, latents = pictures(seed=3), unet_latents(seed=4)
    with torch.no_grad():
        assert torch.equal(taesd.encode(images), baseline.encode(images))
        assert torch.equal(taesd.decode(latents), baseline.decode(latents))
    assert all(not p.requires_grad for p in taesd.parameters()) and not taesd.training


def test_float16_files_load_into_float32(reference, tmp_path):
    encoder, decoder = original_layout(reference.state_dict())
    save_file({k: v.half() for k, v in decoder.items()}, tmp_path / "taesd_decoder.safetensors")
    taesd = load_taesd(tmp_path / "taesd_decoder.safetensors")
    assert {p.dtype for p in taesd.parameters()} == {torch.float32}
    assert torch.equal(taesd.decoder[1].weight, decoder["1.weight"].half().float())


def test_a_decoder_only_file_decodes_and_says_why_it_cannot_encode(reference, taesd_files):
    taesd = load_taesd(taesd_files["pth folder"] / "taesd_decoder.pth")
    with torch.no_grad():
        expected = reference.decode(unet_latents()).sample
        assert relative_error(taesd.decode(unet_latents()), expected) < 1e-5
    with pytest.raises(ValueError, match="has no encoder.*taesd_encoder.pth"):
        taesd.encode(pictures())


def test_an_encoder_only_file_encodes_and_refuses_to_decode(reference, taesd_files):
    taesd = load_taesd(taesd_files["safetensors folder"] / "taesd_encoder.safetensors")
    with torch.no_grad():
        assert relative_error(taesd.encode(pictures()), reference.encode(pictures()).latents) < 1e-5
    with pytest.raises(ValueError, match="has no decoder"):
        taesd.decode(unet_latents())


# -------------------------------------------------------------------- hand-made weights

def probe_weights() -> tuple[dict, dict]:
    """Original-layout weights that pass channel 0 straight through: every 3x3 convolution is the
    centre tap 0 -> 0 (a stride-2 one then keeps the even pixels), residual branches are zero
    (a block is then relu(x)), biases zero; the last convolution copies channel 0 to all outputs."""
    state = {}
    for half, module in (("encoder", TinyAutoencoder().encoder), ("decoder", TinyAutoencoder().decoder)):
        state[half] = {key: torch.zeros_like(tensor) for key, tensor in module.state_dict().items()}
    for half, chain, last in (("encoder", ("0", "2", "6", "10", "14"), "14"),
                              ("decoder", ("1", "7", "12", "17", "19"), "19")):
        for index in chain:
            weight = state[half][f"{index}.weight"]
            outputs = range(weight.shape[0]) if index == last and half == "decoder" else [0]
            for out in outputs:
                weight[out, 0, 1, 1] = 1.0
    return state["encoder"], state["decoder"]


def test_encode_maps_the_projects_pixels_to_taesds_0_to_1(tmp_path):
    encoder, _ = probe_weights()
    torch.save(encoder, tmp_path / "taesd_encoder.pth")
    taesd = load_taesd(tmp_path)
    images = pictures(size=(16, 24))
    latents = taesd.encode(images)
    # channel 0 of the latent = TAESD's pixel (x + 1) / 2 at every 8th pixel (three stride-2 steps)
    torch.testing.assert_close(latents[:, 0], (images[:, 0, ::8, ::8] + 1) / 2, rtol=0, atol=1e-6)
    assert torch.equal(latents[:, 1:], torch.zeros_like(latents[:, 1:]))


def test_decode_clamps_softly_and_maps_taesds_0_to_1_back_to_the_projects_pixels(tmp_path):
    _, decoder = probe_weights()
    save_file(decoder, tmp_path / "taesd_decoder.safetensors")
    taesd = load_taesd(tmp_path)
    latents = unet_latents(size=(2, 3)) * 2
    images = taesd.decode(latents)
    # pixel = 2 relu(3 tanh(z / 3)) - 1 of latent channel 0, repeated over its 8x8 block, all colours
    expected = 2 * torch.relu(3 * torch.tanh(latents[:, 0] / 3)) - 1
    expected = expected.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    for colour in range(3):
        torch.testing.assert_close(images[:, colour], expected, rtol=0, atol=1e-6)


# -------------------------------------------------------------------- refusals

def test_a_missing_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="do not exist.*madebyollin/taesd"):
        load_taesd(tmp_path / "nothing-here")


def test_a_folder_without_taesd_files_says_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="holds no TAESD weights.*diffusion_pytorch_model.safetensors"):
        load_taesd(tmp_path)


@pytest.mark.parametrize("part, says", [
    ("first_stage_model.", "KL autoencoder"),
    ("model.diffusion_model.", "UNet"),
    ("", "whole Stable Diffusion checkpoint"),
])
def test_other_stable_diffusion_weights_are_named_and_refused(part, says, tiny_sd, tmp_path):
    """A KL VAE file (CompVis keys, as vae-ft-mse-*.ckpt), a UNet alone, a whole SD v1 file."""
    state = {key[len(part):] if part == "first_stage_model." else key: tensor
             for key, tensor in tiny_sd.items() if key.startswith(part)}
    save_file(state, tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=f"not a TAESD file: .*{says}.*madebyollin/taesd"):
        load_taesd(tmp_path / "weights.safetensors")


def test_a_taesd_for_16_channel_latents_is_refused(tmp_path):
    diffusers.AutoencoderTiny(latent_channels=16).save_pretrained(tmp_path / "taef1", safe_serialization=True)
    (tmp_path / "taef1" / "config.json").unlink()  # the weights alone must tell
    with pytest.raises(CheckpointError, match="16-channel latents.*FLUX.*madebyollin/taesd"):
        load_taesd(tmp_path / "taef1")


def test_taesdxl_is_refused_by_its_name_and_by_its_config(taesd_files, tmp_path):
    named = tmp_path / "taesdxl_decoder.pth"
    named.write_bytes((taesd_files["pth folder"] / "taesd_decoder.pth").read_bytes())
    with pytest.raises(CheckpointError, match="SDXL.*madebyollin/taesd"):
        load_taesd(named)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(taesd_files["diffusers file"].read_bytes())
    config = json.loads((taesd_files["diffusers folder"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "madebyollin/taesdxl"}))
    with pytest.raises(CheckpointError, match="SDXL.*madebyollin/taesd"):
        load_taesd(folder)


def test_a_config_naming_a_folder_with_xl_in_it_is_not_taesdxl(taesd_files, tmp_path):
    """diffusers' save_pretrained records the folder it loaded from as ``_name_or_path``: a user
    folder such as /Users/alexlee/taesd holds "xl" but is SD v1/2's TAESD and must load."""
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(taesd_files["diffusers file"].read_bytes())
    config = json.loads((taesd_files["diffusers folder"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "/Users/alexlee/taesd"}))
    assert load_taesd(folder).decoder is not None
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "stabilityai/sdxl-vae-tiny"}))
    with pytest.raises(CheckpointError, match="SDXL"):
        load_taesd(folder)


def test_a_damaged_taesd_file_names_the_missing_tensors(reference, tmp_path):
    _, decoder = original_layout(reference.state_dict())
    del decoder["8.conv.2.weight"]
    save_file(decoder, tmp_path / "taesd_decoder.safetensors")
    with pytest.raises(CheckpointError, match="does not fit TAESD's decoder .*missing 8.conv.2.weight"):
        load_taesd(tmp_path / "taesd_decoder.safetensors")


def test_a_file_that_is_no_checkpoint_gets_taesd_advice(tmp_path):
    (tmp_path / "taesd_decoder.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError, match="neither a torch checkpoint.*madebyollin/taesd") as refused:
        load_taesd(tmp_path / "taesd_decoder.pth")
    assert "Stable Diffusion .ckpt" not in str(refused.value)


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(payload, reference, tmp_path):
    marker = tmp_path / "pwned"
    _, decoder = original_layout(reference.state_dict())
    torch.save({**decoder, "extra": payload(marker)}, tmp_path / "taesd_decoder.pth")
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_taesd(tmp_path / "taesd_decoder.pth")
    assert not marker.exists()


def test_bad_shapes_are_value_errors():
    taesd = TinyAutoencoder()
    with pytest.raises(ValueError, match="multiples of 8"):
        taesd.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(batch, 4, height, width\)"):
        taesd.decode(torch.zeros(1, 16, 4, 4))


# -------------------------------------------------------------------- speed helper

def test_decode_seconds_is_the_median_of_the_timed_calls_after_one_warm_up():
    calls = []

    def fake_decode(latents):
        calls.append(torch.is_inference_mode_enabled())
        return latents

    seconds = decode_seconds(fake_decode, torch.zeros(1, 4, 8, 8), repeats=3)
    assert calls == [True] * 4 and 0 <= seconds < 0.1
    with pytest.raises(ValueError, match="repeats"):
        decode_seconds(fake_decode, torch.zeros(1, 4, 8, 8), repeats=0)


# -------------------------------------------------------------------- --vae's hash

def test_vae_hash_is_of_the_weight_files_read_and_only_those(taesd_files, tmp_path):
    """``--vae``'s hash, recorded and checked by --resume: sha256 of each file's name and bytes, by
    name, of the files load_taesd reads; a stray file beside them (an old taesd_decoder.pth next to
    diffusers' single file, which is read instead) changes nothing."""
    import hashlib
    import shutil

    from sounddiffusion.model.tiny_vae import load_tiny_vae

    def expected(*files):
        return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:16]

    pair = taesd_files["pth folder"]
    assert load_tiny_vae(f"taesd:{pair}").hash == expected(pair / "taesd_decoder.pth", pair / "taesd_encoder.pth")
    folder = tmp_path / "diffusers"
    shutil.copytree(taesd_files["diffusers folder"], folder)
    single = expected(folder / "diffusion_pytorch_model.safetensors")
    assert load_tiny_vae(f"taesd:{folder}").hash == single
    (folder / "taesd_decoder.pth").write_bytes((pair / "taesd_decoder.pth").read_bytes())
    assert load_tiny_vae(f"taesd:{folder}").hash == single
