"""LoRA names onto CompVis layers, checked against diffusers and transformers holding the same weights:
UNets of other layouts than SD v1 (the deepest level with attention, where an output block's upsampler is
its layer 2), and SD 2.x's OpenCLIP text tower with q, k, v stacked in one in_proj_weight."""
import copy

import pytest
import torch
from omegaconf import OmegaConf

from conftest import DATA
from ldm.util import instantiate_from_config, load_model_from_config
from lora_makers import kohya, peft, random_pair, save, update
from scripts.diffusers_conversion import diffusers_unet_config, unet_to_diffusers
from sounddiffusion.model.lora import apply_loras

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key  # noqa: E402

LAYOUTS = {  # UNet params over tiny-v1's; every level has 32k channels (GroupNorm's 32 groups)
    "deepest level with attention": dict(channel_mult=[1, 2], attention_resolutions=[1, 2], num_res_blocks=1),
    "SD v1 (no attention at the deepest level)": dict(channel_mult=[1, 1, 2], attention_resolutions=[1, 2],
                                                      num_res_blocks=2),
    "attention only in the middle": dict(channel_mult=[1, 2], attention_resolutions=[], num_res_blocks=1),
}


def model_with_unet(reference_dir, **unet_params):
    """A LatentDiffusion of tiny-v1's config with another UNet layout, all of its UNet weights random."""
    config = OmegaConf.load(reference_dir / "tiny-v1" / "config.yaml")
    config.model.params.unet_config.params.update(num_heads=2, **unet_params)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.model.diffusion_model.parameters():  # also the zero-initialized output layers
            p.add_(torch.randn_like(p) * 0.05)
    return model, dict(config.model.params.unet_config.params)


def diffusers_module_name(kohya_name: str) -> str:
    """The diffusers module a kohya name means, by diffusers' own converter (``...attn1.processor.to_q_lora``,
    ``...conv1.lora``)."""
    name = _convert_unet_lora_key(f"{kohya_name}.lora_down.weight").removesuffix(".down.weight")
    name = name.replace(".processor.", ".").replace("to_out_lora", "to_out.0_lora")
    return name.removesuffix("_lora").removesuffix(".lora")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda name: name.split(" (")[0].replace(" ", "-"))
def test_unet_lora_merges_as_diffusers_on_the_same_weights(reference_dir, tmp_path, layout):
    model, params = model_with_unet(reference_dir, **LAYOUTS[layout])
    unet = model.model.diffusion_model
    with torch.device("meta"):
        twin = diffusers.UNet2DConditionModel(**diffusers_unet_config(params))
    twin.load_state_dict({k: v.clone() for k, v in unet_to_diffusers(unet.state_dict(), params).items()},
                         strict=True, assign=True)
    twin.eval().requires_grad_(False)
    # A LoRA on every conv and linear layer of diffusers' UNet, named the kohya way from diffusers' names.
    tensors, weight = {}, 0.7
    layers = [(n, m) for n, m in twin.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for seed, (name, layer) in enumerate(layers):
        kernel = layer.kernel_size[0] if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size[0] > 1 else 0
        down, up = random_pair(layer.weight.shape[0], layer.weight.shape[1], 4, kernel, seed=seed)
        if isinstance(layer, torch.nn.Conv2d) and not kernel:
            down, up = down[..., None, None], up[..., None, None]  # LoCon's 1x1 convolutions
        tensors.update(kohya(f"lora_unet_{name.replace('.', '_')}", down * 0.3, up * 0.3, alpha=(1, 2, 4)[seed % 3]))
    path = save(tmp_path / "locon.safetensors", tensors)
    # diffusers' side, merged by hand through diffusers' own kohya-name converter.
    with torch.no_grad():
        for stem in {k.split(".")[0] for k in tensors}:
            w = twin.get_submodule(diffusers_module_name(stem)).weight
            down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
            w += (weight * update(down, up, float(tensors[f"{stem}.alpha"]) / down.shape[0], w.shape)).float()
    patch = apply_loras(model, [(path, weight)], keep_original=True)
    assert len(patch.touched) == len(layers)
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        ours = unet(x, t, context=context)
        theirs = twin(x, t, encoder_hidden_states=context).sample
        patch.restore()
        base = unet(x, t, context=context)
    err = float((ours - theirs).abs().max()) / (1 + float(theirs.abs().max()))
    assert err < 1e-4, err
    assert float((ours - base).abs().max()) > 1e-1  # the LoRA changes the output far more than the tolerance


@pytest.fixture(scope="module")
def tiny_v2():
    return load_model_from_config(DATA / "tiny-v2" / "config.yaml", DATA / "tiny-v2" / "model.safetensors",
                                  device="cpu").float()


def openclip_lora(tmp_path):
    """A LoRA on text-encoder layers 0 and 1 (transformers' names; q/k/v kohya, out/mlp peft) and on three
    UNet layers of tiny-v2 (text width 48; UNet levels of 32, 64, 64 channels, attention at every level).
    Returns (the file, {module name: (down, up, scale)})."""
    files = {
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj": (48, 48, 0),
        "lora_te_text_model_encoder_layers_1_self_attn_k_proj": (48, 48, 0),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj": (48, 48, 0),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (48, 48, 0),
        "text_encoder.text_model.encoder.layers.0.self_attn.out_proj": (48, 48, 0),
        "text_encoder.text_model.encoder.layers.1.mlp.fc1": (192, 48, 0),
        "text_encoder.text_model.encoder.layers.0.mlp.fc2": (48, 192, 0),
        "lora_unet_up_blocks_0_upsamplers_0_conv": (64, 64, 3),
        "lora_unet_down_blocks_1_attentions_0_proj_in": (64, 64, 1),  # a 1x1-conv LoRA on a linear layer
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": (64, 48, 0),
    }
    tensors, modules = {}, {}
    for seed, (name, (out, inp, kernel)) in enumerate(files.items()):
        down, up = random_pair(out, inp, 4, kernel if kernel > 1 else 0, seed=seed)
        if kernel == 1:
            down, up = down[..., None, None], up[..., None, None]
        alpha = 2.0 if name.startswith("lora_") else None  # peft: scale 1
        tensors.update(kohya(name, down, up, alpha) if name.startswith("lora_") else peft(name, down, up))
        modules[name] = (down, up, 0.5 if alpha else 1.0)
    return save(tmp_path / "v2.safetensors", tensors), modules


def test_sd2_lora_merges_onto_openclip_rows_and_the_unet_as_written_out(tiny_v2, tmp_path):
    path, modules = openclip_lora(tmp_path)
    te, u = "cond_stage_model.model.transformer.resblocks.", "model.diffusion_model."
    where = {  # written out by hand: OpenCLIP stacks q, k, v rows in in_proj_weight (width 48)
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj": (te + "1.attn.in_proj_weight", slice(0, 48)),
        "lora_te_text_model_encoder_layers_1_self_attn_k_proj": (te + "1.attn.in_proj_weight", slice(48, 96)),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj": (te + "1.attn.in_proj_weight", slice(96, 144)),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (te + "0.attn.in_proj_weight", slice(48, 96)),
        "text_encoder.text_model.encoder.layers.0.self_attn.out_proj": (te + "0.attn.out_proj.weight", slice(None)),
        "text_encoder.text_model.encoder.layers.1.mlp.fc1": (te + "1.mlp.c_fc.weight", slice(None)),
        "text_encoder.text_model.encoder.layers.0.mlp.fc2": (te + "0.mlp.c_proj.weight", slice(None)),
        # tiny-v2: 3 levels, 2 ResBlocks each, attention everywhere: output block 2 = ResBlock, transformer, upsampler
        "lora_unet_up_blocks_0_upsamplers_0_conv": (u + "output_blocks.2.2.conv.weight", slice(None)),
        "lora_unet_down_blocks_1_attentions_0_proj_in": (u + "input_blocks.4.1.proj_in.weight", slice(None)),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":
            (u + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", slice(None)),
    }
    before = {k: v.clone() for k, v in tiny_v2.state_dict().items()}
    expected = {k: v.double() for k, v in before.items()}
    for name, (param, rows) in where.items():
        down, up, scale = modules[name]
        expected[param][rows] += -0.6 * update(down, up, scale, expected[param][rows].shape)
    patch = apply_loras(tiny_v2, [(path, -0.6)], keep_original=True)
    after = tiny_v2.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == sorted({param for param, _ in where.values()})
    for key in changed:
        err = float((after[key].double() - expected[key]).abs().max())
        assert err < 1e-6 * (1 + float(expected[key].abs().max())), key
    patch.restore()
    assert all(torch.equal(v, before[k]) for k, v in tiny_v2.state_dict().items())


def transformers_twin(openclip) -> "transformers.CLIPTextModel":
    """transformers' CLIPTextModel holding an OpenCLIP tower's weights (in_proj rows split into q, k, v)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = openclip.transformer.resblocks
    width = openclip.ln_final.normalized_shape[0]
    config = CLIPTextConfig(vocab_size=openclip.token_embedding.num_embeddings, hidden_size=width,
                            intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
                            num_attention_heads=blocks[0].heads, max_position_embeddings=77, hidden_act="gelu",
                            layer_norm_eps=1e-5)
    twin = CLIPTextModel(config).eval()
    state = {"embeddings.token_embedding.weight": openclip.token_embedding.weight,
             "embeddings.position_embedding.weight": openclip.positional_embedding,
             "final_layer_norm.weight": openclip.ln_final.weight, "final_layer_norm.bias": openclip.ln_final.bias}
    for n, block in enumerate(blocks):
        p = f"encoder.layers.{n}."
        for i, q in enumerate(("q_proj", "k_proj", "v_proj")):
            state[p + f"self_attn.{q}.weight"] = block.attn.in_proj_weight[i * width:(i + 1) * width]
            state[p + f"self_attn.{q}.bias"] = block.attn.in_proj_bias[i * width:(i + 1) * width]
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            module = block.get_submodule(ours)
            state[p + theirs + ".weight"], state[p + theirs + ".bias"] = module.weight, module.bias
    twin_state = twin.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in twin_state) else ""
    twin.load_state_dict({prefix + k: v.detach().clone() for k, v in state.items()}, strict=False)
    return twin, prefix


def test_sd2_text_lora_conditions_as_transformers_clip_with_the_lora(tiny_v2, tmp_path):
    path, modules = openclip_lora(tmp_path)
    model = copy.deepcopy(tiny_v2)
    twin, prefix = transformers_twin(model.cond_stage_model.model)
    with torch.no_grad():  # the LoRA merged into transformers' layers by their own names
        for name, (down, up, scale) in modules.items():
            if "unet" in name:
                continue
            layer = (name.removeprefix("text_encoder.text_model.") if "." in name
                     else name.removeprefix("lora_te_text_model_").replace("_", ".").replace("self.attn", "self_attn")
                     .replace("q.proj", "q_proj").replace("k.proj", "k_proj").replace("v.proj", "v_proj"))
            w = twin.get_submodule(prefix + layer).weight
            w += (0.9 * update(down, up, scale, w.shape)).float()
    apply_loras(model, [(path, 0.9)])
    prompts = ["a lighthouse on a cliff at dusk", "an orchestra of glass birds"]
    with torch.no_grad():
        ours = model.get_learned_conditioning(prompts)
        hidden = twin(input_ids=model.cond_stage_model.tokenize(prompts), output_hidden_states=True).hidden_states
        theirs = twin.get_submodule(prefix + "final_layer_norm")(hidden[-2])  # SD 2.x: penultimate layer
        base = tiny_v2.get_learned_conditioning(prompts)
    assert float((ours - theirs).abs().max()) < 1e-4 * (1 + float(theirs.abs().max()))
    assert float((ours - base).abs().max()) > 1e-2
