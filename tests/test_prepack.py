"""ldm.modules.prepack: layers with pre-packed oneDNN weights compute what nn.Conv2d / nn.Linear
compute, keep their state dict, repack after a weight change, and step aside where they must."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ldm.modules.prepack import PrepackedConv2d, PrepackedLinear, prepack_supported, prepack_weights
from sounddiffusion.model.loading import engine_for_model

pytestmark = pytest.mark.skipif(not prepack_supported(), reason="this PyTorch build has no oneDNN packed-weight ops")


def layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4),
                         nn.Conv2d(16, 4, 1), nn.Flatten(2), nn.Linear(16, 24)).eval()


def test_same_outputs_and_state_dict():
    plain = layers()
    packed = layers()
    before = {k: v.clone() for k, v in packed.state_dict().items()}
    assert prepack_weights(packed) == 4
    assert [type(m) for m in packed][:3] == [PrepackedConv2d] * 3 and type(packed[4]) is PrepackedLinear
    x = torch.randn(2, 8, 8, 8)
    with torch.inference_mode():
        expected = plain(x)
        for _ in range(2):  # the second call reuses the packed weights
            assert torch.allclose(packed(x), expected, atol=1e-5)
        # another input size repacks for it
        assert torch.allclose(packed(x[:1]), plain(x[:1]), atol=1e-5)
    after = packed.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_loaded_weights_are_repacked():
    packed = layers()
    prepack_weights(packed)
    x = torch.randn(1, 8, 8, 8)
    with torch.inference_mode():
        packed(x)
    other = layers()
    for param in other.parameters():
        param.data.mul_(-2)
    packed.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert torch.allclose(packed(x), other(x), atol=1e-5)


def test_autograd_and_autocast_take_the_ordinary_path():
    packed = layers().train()
    prepack_weights(packed)
    x = torch.randn(1, 8, 8, 8)
    packed(x).sum().backward()
    assert all(p.grad is not None for p in packed.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed(x).dtype == torch.bfloat16


@pytest.mark.parametrize("channels_last", [False, True])
def test_engine_packs_on_cpu_and_keeps_the_reference_outputs(tiny_dir, channels_last):
    """Also with the NHWC layout CUDA engines use (only the layout changes, not the numbers)."""
    from omegaconf import OmegaConf
    from ldm.util import load_model_from_config

    model = load_model_from_config(OmegaConf.load(tiny_dir / "config.yaml"), str(tiny_dir / "model.safetensors"))
    engine = engine_for_model(model, device="cpu", precision="full", channels_last=channels_last)
    unet = engine.model.model.diffusion_model
    assert isinstance(unet.input_blocks[0][0], PrepackedConv2d)
    for conv in (unet.input_blocks[0][0], engine.model.first_stage_model.decoder.conv_in):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    golden = load_file(tiny_dir / "golden.safetensors")
    with torch.inference_mode():
        eps = engine.model.apply_model(golden["unet_x"], golden["unet_t"], golden["text_cond"][:2])
        decoded = engine.model.decode_first_stage(0.18215 * golden["vae_mean"])
    for ours, ref in ((eps, golden["unet_eps"]), (decoded, golden["vae_decoded"])):
        assert float((ours - ref).abs().max()) <= 1e-4 * (1 + float(ref.abs().max()))


def test_engine_does_not_pack_without_the_memory_for_it(tiny_dir, monkeypatch):
    from omegaconf import OmegaConf
    from ldm.util import load_model_from_config
    from sounddiffusion.model import loading

    monkeypatch.setattr(loading, "available_memory", lambda: 1 << 20)  # 1 MiB free
    model = load_model_from_config(OmegaConf.load(tiny_dir / "config.yaml"), str(tiny_dir / "model.safetensors"))
    engine = loading.engine_for_model(model, device="cpu", precision="full")
    assert type(engine.model.model.diffusion_model.input_blocks[0][0]) is nn.Conv2d
