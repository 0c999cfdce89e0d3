"""LoRA files Sound Diffusion cannot use: each refused with one line that names the file and says what
to do, before the model changes; keys that match nothing in a fitting file: one warning."""
import logging

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.util import load_model_from_config
from lora_makers import kohya, random_pair, save
from malicious_pickles import PAYLOADS
from sounddiffusion.errors import ModelError, ParameterError
from sounddiffusion.model.lora import apply_loras, load_loras

TO_K = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"  # cross-attention keys: (64, 32) in tiny-v1


@pytest.fixture(scope="module")
def model(reference_dir):
    """The tiny-v1 model; every test leaves it as it was (a refusal must not change it)."""
    config = OmegaConf.load(reference_dir / "tiny-v1" / "config.yaml")
    return load_model_from_config(config, reference_dir / "tiny-v1" / "model.safetensors", device="cpu").float()


@pytest.fixture(scope="module")
def original(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def good(tmp_path):
    return save(tmp_path / "good.safetensors", kohya(TO_K, *random_pair(64, 32, 4)))


def refused(model, original, specs, error=ModelError, *words) -> str:
    with pytest.raises(error) as caught:
        apply_loras(model, specs)
    message = str(caught.value)
    assert "\n" not in message and ": " in message, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items()), "a refused load changed the model"
    return message


def test_missing_file_and_folder(model, original, tmp_path, good):
    refused(model, original, [(good, 1.0), (tmp_path / "nope.safetensors", 1.0)], ModelError,
            str(tmp_path / "nope.safetensors"), "does not exist", "check the path")
    refused(model, original, [(tmp_path, 1.0)], ModelError, str(tmp_path), "folder", ".safetensors file")


@pytest.mark.parametrize("content", [b"", b"not a lora at all, just text\n", b"\x00" * 64])
def test_a_file_in_no_known_format(model, original, tmp_path, content):
    path = tmp_path / "style.safetensors"
    path.write_bytes(content)
    refused(model, original, [(path, 1.0)], ModelError, str(path), "LoRA .safetensors file")


@pytest.mark.parametrize("keep", [20, -100], ids=["in-the-header", "in-the-tensors"])
def test_a_truncated_file(model, original, tmp_path, good, keep):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good.read_bytes()[:keep])
    refused(model, original, [(path, 1.0)], ModelError, str(path), "download it again")


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(model, original, tmp_path, payload):
    marker, path = tmp_path / "pwned", tmp_path / "style.pt"
    torch.save({**kohya(TO_K, *random_pair(64, 32, 4)), "hook": payload(marker)}, path)
    refused(model, original, [(path, 1.0)], ModelError, str(path), "unsafe", "safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("key,shape", [
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (768, 768)),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", (5120, 1280)),
    ("lora_unet_label_emb_0_0", (1280, 2816)),
])
def test_sdxl_names_say_sdxl(model, original, tmp_path, key, shape):
    path = save(tmp_path / "xl.safetensors", kohya(key, *random_pair(*shape, 4)))
    refused(model, original, [(path, 1.0)], ModelError, str(path), "SDXL", "use a LoRA made for SD v1 or SD 2.x")


@pytest.mark.parametrize("key,shape", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", (640, 2048)),  # SDXL's 2-block transformers
    ("lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k", (1280, 2048)),  # a layer tiny-v1 has, too wide
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2", (1280, 5120)),
])
def test_sdxl_unet_layers_under_compvis_or_diffusers_names_say_sdxl(model, original, tmp_path, key, shape):
    path = save(tmp_path / "xl-unet.safetensors", kohya(key, *random_pair(*shape, 4)))
    refused(model, original, [(path, 1.0)], ModelError, str(path), "is for SDXL", "use a LoRA made for SD v1")


@pytest.mark.parametrize("width,family", [(768, "SD v1"), (1024, "SD 2.x"), (2048, "SDXL")])
def test_shapes_of_another_model_say_which_family_the_file_is_for(model, original, tmp_path, width, family):
    path = save(tmp_path / "wide.safetensors", {**kohya(TO_K, *random_pair(64, width, 4)),
                                                 **kohya("lora_unet_down_blocks_0_resnets_0_conv1",
                                                         *random_pair(32, 32, 4, kernel=3))})
    message = refused(model, original, [(path, 1.0)], ModelError, str(path), f"is for {family}",
                      "SD v1 model (32-wide", "attn2.to_k", "use a LoRA made for SD v1")
    assert f"({64}, {width})" in message


def test_a_file_whose_keys_match_nothing(model, original, tmp_path):
    path = save(tmp_path / "other.safetensors", {**kohya("lora_transformer_blocks_3_attn_to_q", *random_pair(8, 8, 2)),
                                                  **kohya("lora_vae_decoder_conv_in", *random_pair(8, 8, 2))})
    refused(model, original, [(path, 1.0)], ModelError, str(path), "fits no layer", "lora_transformer_blocks_3")


def test_a_full_checkpoint_is_not_a_lora(model, original, reference_dir):
    path = reference_dir / "tiny-v1" / "model.safetensors"
    refused(model, original, [(path, 1.0)], ModelError, str(path), "is not a LoRA", "lora_down")


@pytest.mark.parametrize("keys,kind", [
    (["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"], "LoHa"),
    (["lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"], "LoKr"),
    (["lora_down.weight", "lora_up.weight", "lora_mid.weight"], "Tucker"),
    (["lora_down.weight", "lora_up.weight", "dora_scale"], "DoRA"),
])
def test_lycoris_types_that_are_not_lora_say_so(model, original, tmp_path, keys, kind):
    path = save(tmp_path / "lycoris.safetensors", {f"{TO_K}.{k}": torch.ones(2, 2) for k in keys})
    refused(model, original, [(path, 1.0)], ModelError, str(path), kind, "not merge", "LoCon")


def test_a_module_whose_down_and_up_do_not_compose(model, original, tmp_path):
    down, up = random_pair(64, 32, 4)
    path = save(tmp_path / "broken.safetensors", kohya(TO_K, down, up[:, :3]))
    refused(model, original, [(path, 1.0)], ModelError, str(path), "damaged", TO_K, "download it again")


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "0.5", None, True])
def test_a_weight_that_is_not_a_finite_number(model, original, good, weight):
    refused(model, original, [(good, weight)], ParameterError, str(good), "finite number", "0.8")


def test_set_weights_wants_one_finite_weight_per_file(model, original, good):
    patch = load_loras(model, [(good, 0.5)])
    with pytest.raises(ParameterError, match="2 LoRA weights given for 1 LoRA files: give one weight per file"):
        patch.set_weights([0.5, 0.5])
    with pytest.raises(ParameterError, match="LoRA weight nan for .*good.safetensors is not a finite number"):
        patch.set_weights([float("nan")])
    assert patch.weights == (0.5,)
    patch.restore()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_keys_matching_nothing_in_a_fitting_file_are_one_warning(model, original, tmp_path, caplog, good):
    tensors = {**load_file(good), **kohya("lora_unet_down_blocks_9_resnets_0_conv1", *random_pair(8, 8, 2)),
               **kohya("lora_te_text_model_encoder_layers_7_mlp_fc1", *random_pair(8, 8, 2)),
               "bundle_emb.sparkle.string_to_param.*": torch.ones(2, 32)}  # an embedding bundled as A1111 allows
    path = save(tmp_path / "partly.safetensors", tensors)
    with caplog.at_level(logging.DEBUG, logger="sounddiffusion.model.lora"):
        patch = apply_loras(model, [(path, 1.0)], keep_original=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "2 of its 3 modules match no layer of this model, and 1 of its tensors" in warnings[0].getMessage()
    debug = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    for left_out in ("lora_unet_down_blocks_9_resnets_0_conv1", "lora_te_text_model_encoder_layers_7_mlp_fc1",
                     "bundle_emb.sparkle.string_to_param.*"):
        assert left_out in debug
    assert len(patch.touched) == 1
    patch.restore()
