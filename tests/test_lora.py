"""LoRA merging (sounddiffusion.model.lora) on the tiny SD-v1 model: the reference merge of
../shared/reference/lora, weight 0, two files adding, exact restore, per-frame set_weights, the file
formats' spellings and alphas, hashes, pickled files."""
import hashlib
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.prepack import prepack_supported, prepack_weights
from ldm.util import load_model_from_config
from lora_makers import kohya, peft, random_pair, save, update
from sounddiffusion.model import lora
from sounddiffusion.model.lora import apply_loras, load_loras

UNET = "model.diffusion_model."
# Layers both reference files change: (kohya name, peft name, CompVis parameter), names written out by hand.
SHARED_LAYERS = [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0.attentions.0.proj_in",
     UNET + "input_blocks.1.1.proj_in.weight"),  # 1x1 convolution
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet.down_blocks.0.resnets.0.conv1",
     UNET + "input_blocks.1.0.in_layers.2.weight"),  # 3x3 LoCon
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
     "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
     UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
    ("lora_unet_up_blocks_2_upsamplers_0_conv", "unet.up_blocks.2.upsamplers.0.conv",
     UNET + "output_blocks.8.2.conv.weight"),  # the upsampler after a level with attention
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "TEXT encoder.layers.0.self_attn.q_proj.weight"),
]


@pytest.fixture(scope="module")
def lora_dir(reference_dir):
    return reference_dir / "lora"


@pytest.fixture(scope="module")
def fresh(reference_dir):
    """() -> a newly loaded tiny-v1 model, float32 on the CPU."""
    config = OmegaConf.load(reference_dir / "tiny-v1" / "config.yaml")
    return lambda: load_model_from_config(config, reference_dir / "tiny-v1" / "model.safetensors", device="cpu").float()


def parameter_name(model, name: str) -> str:
    """SHARED_LAYERS' "TEXT ..." names: the text tower's keys start with or without "text_model." by
    transformers version."""
    if not name.startswith("TEXT "):
        return name
    return next(k for k in model.state_dict() if k.startswith("cond_stage_model.") and k.endswith(name[5:]))


def same_state(a, b) -> list[str]:
    """Keys whose tensors differ in any bit."""
    sa, sb = a.state_dict(), b.state_dict()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def rel_err(ours, ref) -> float:
    return float((ours - ref).abs().max()) / (1 + float(ref.abs().max()))


@pytest.mark.parametrize("case", ["kohya08", "kohya08_peft05"])
def test_merged_model_matches_the_reference(case, fresh, lora_dir):
    meta = json.loads((lora_dir / "golden.json").read_text())
    g = load_file(lora_dir / "golden.safetensors")
    model = fresh()
    apply_loras(model, [(lora_dir / f, w) for f, w in meta["cases"][case]])
    with torch.no_grad():
        assert rel_err(model.get_learned_conditioning(meta["prompts"]), g[f"{case}_text_cond"]) <= 1e-4
        cond = g[f"{case}_text_cond"]
        assert rel_err(model.apply_model(g["unet_x"], g["unet_t"], cond[:2]), g[f"{case}_unet_eps"]) <= 1e-4
        uc = model.get_learned_conditioning([""])
        latent, _ = DDIMSampler(model).sample(S=meta["steps"], conditioning=cond[0:1], batch_size=1,
                                              shape=list(g["x_T"].shape[1:]), verbose=False, eta=0.0,
                                              unconditional_guidance_scale=meta["scale"],
                                              unconditional_conditioning=uc, x_T=g["x_T"].clone())
    assert rel_err(latent, g[f"{case}_ddim_latent"]) <= 2e-3
    # ... and the LoRA mattered: the base model is far from the merged reference.
    assert rel_err(g["base_unet_eps"], g[f"{case}_unet_eps"]) > 1e-2


def test_weight_zero_gives_the_base_model_bit_for_bit(fresh, lora_dir):
    base, model = fresh(), fresh()
    apply_loras(model, [(lora_dir / "lora-kohya.safetensors", 0.0), (lora_dir / "lora-peft.safetensors", 0)])
    assert same_state(base, model) == []
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        c = base.get_learned_conditioning(["a cat"])
        assert torch.equal(c, model.get_learned_conditioning(["a cat"]))
        assert torch.equal(base.apply_model(x, t, c), model.apply_model(x, t, c))


def test_two_loras_add_as_the_formula_says(fresh, lora_dir):
    k = load_file(lora_dir / "lora-kohya.safetensors")
    p = load_file(lora_dir / "lora-peft.safetensors")
    a, b = 0.8, -0.35
    base, model = fresh(), fresh()
    apply_loras(model, [(lora_dir / "lora-kohya.safetensors", a), (lora_dir / "lora-peft.safetensors", b)])
    for kname, pname, param in SHARED_LAYERS:
        param = parameter_name(model, param)
        w0 = base.state_dict()[param]
        down, up = k[f"{kname}.lora_down.weight"], k[f"{kname}.lora_up.weight"]
        alpha = float(k.get(f"{kname}.alpha", down.shape[0]))  # absent: alpha = rank
        expected = (w0.double() + a * update(down, up, alpha / down.shape[0], w0.shape)
                    + b * update(p[f"{pname}.lora_A.weight"], p[f"{pname}.lora_B.weight"], 1.0, w0.shape))
        assert rel_err(model.state_dict()[param].double(), expected) < 1e-6, param


def test_restore_gives_the_original_weights_bit_for_bit(fresh, lora_dir):
    files = [(lora_dir / "lora-kohya.safetensors", 0.8), (lora_dir / "lora-peft.safetensors", 0.5)]
    base = fresh()
    model = fresh()
    patch = apply_loras(model, files, keep_original=True)
    assert len(same_state(base, model)) == len(patch.touched)
    patch.restore()
    assert same_state(base, model) == []
    patch = load_loras(model, files)
    for weights in ([0.3, -1.2], [1.7, 0.0], [2.5, 3.5]):
        patch.set_weights(weights)
    patch.restore()
    assert same_state(base, model) == []


def test_constant_weights_keep_no_copy_of_the_originals_unless_asked(fresh, lora_dir):
    """The engine merges constant weights for good: nothing is kept (a LoCon on the whole SD v1 UNet
    would keep 3.4 GB); keep_original=True keeps each touched weight once, for restore()."""
    files = [(lora_dir / "lora-kohya.safetensors", 0.8), (lora_dir / "lora-peft.safetensors", 0.5)]
    model = fresh()
    patch = apply_loras(model, files)
    assert patch.kept_bytes == 0
    with pytest.raises(RuntimeError, match="keep_original=True"):
        patch.restore()
    kept_model = fresh()
    kept = apply_loras(kept_model, files, keep_original=True)
    sizes = [model.get_parameter(name)[slice(*rows) if rows else slice(None)].nbytes for name, rows in kept.touched]
    assert kept.kept_bytes == sum(sizes) > 0
    assert same_state(model, kept_model) == []  # both merge the same numbers, bit for bit


def test_set_weights_rewrites_only_what_changed_without_reading_or_multiplying(fresh, lora_dir, monkeypatch):
    kohya_file, peft_file = lora_dir / "lora-kohya.safetensors", lora_dir / "lora-peft.safetensors"
    meta = json.loads((lora_dir / "golden.json").read_text())
    model = fresh()
    versions = {name: p._version for name, p in model.named_parameters()}
    patch = load_loras(model, [(kohya_file, 0.7), (peft_file, 0.2)])
    touched = {name for name, _ in patch.touched}
    assert len(touched) == meta["kohya_modules"]  # the peft file's layers are among the kohya file's
    written = {name for name, p in model.named_parameters() if p._version != versions[name]}
    assert written == touched

    def refuse(*args, **kwargs):
        raise AssertionError("set_weights read a file or recomputed up @ down")
    monkeypatch.setattr(lora, "read_lora", refuse)
    monkeypatch.setattr(lora, "_delta", refuse)
    monkeypatch.setattr(torch, "matmul", refuse)
    versions = {name: p._version for name, p in model.named_parameters()}
    before = {name: p.clone() for name, p in model.named_parameters()}
    rewritten = patch.set_weights([0.7, 0.9])  # only the peft file's weight changes
    written = {name for name, p in model.named_parameters() if p._version != versions[name]}
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert len(written) == meta["peft_modules"] and changed == written
    assert {name for name, _ in rewritten} == written  # what it reports is what it wrote
    versions = {name: p._version for name, p in model.named_parameters()}
    assert patch.set_weights([0.7, 0.9]) == []
    assert all(p._version == versions[name] for name, p in model.named_parameters())


def test_only_a_text_encoder_weight_change_forgets_the_prompts_conditionings(fresh, tmp_path):
    """Two scheduled LoRAs, one on the UNet, one on the text encoder: a frame that changes only the
    UNet's keeps the cached conditionings (the text encoder is as it was); the text one's drops them."""
    from sounddiffusion.model.loading import engine_for_model
    from sounddiffusion.model.lora_specs import parse_lora_specs

    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    text_q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    unet_only = save(tmp_path / "unet.safetensors", kohya(to_k, *random_pair(32, 32, 4)))
    text_only = save(tmp_path / "text.safetensors", kohya(text_q, *random_pair(32, 32, 4, seed=1)))
    specs = parse_lora_specs([f"{unet_only}:0.5*onset", f"{text_only}:0.5*low"], schedules=True)
    engine = engine_for_model(fresh(), device="cpu", loras=specs)
    engine.set_lora_weights([0.0, 0.3])
    cond = engine.text_conditioning("a red house")
    engine.set_lora_weights([0.8, 0.3])
    assert engine.text_conditioning("a red house") is cond  # still the cached tensor
    engine.set_lora_weights([0.8, 0.9])
    assert not torch.equal(engine.text_conditioning("a red house"), cond)


def test_set_weights_equals_apply_loras_whatever_came_before(fresh, lora_dir):
    files = [lora_dir / "lora-kohya.safetensors", lora_dir / "lora-peft.safetensors"]
    model = fresh()
    patch = load_loras(model, [(f, 0.0) for f in files])
    for weights in ([1.5, -0.5], [0.0, 2.0], [0.25, 0.6]):
        patch.set_weights(weights)
    assert patch.weights == (0.25, 0.6)
    merged_once = fresh()
    apply_loras(merged_once, list(zip(files, [0.25, 0.6])))
    assert same_state(model, merged_once) == []


@pytest.mark.skipif(not prepack_supported(), reason="this PyTorch has no oneDNN weight pre-packing")
def test_prepacked_layers_compute_with_the_new_weights(fresh, lora_dir):
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    model, plain = fresh(), fresh()
    prepack_weights(model.model.diffusion_model)
    with torch.no_grad():
        c = model.get_learned_conditioning(["a red boat"])
        base = model.apply_model(x, t, c)  # packs every weight once
        patch = load_loras(model, [(lora_dir / "lora-kohya.safetensors", 0.8)])
        apply_loras(plain, [(lora_dir / "lora-kohya.safetensors", 0.8)])
        merged, expected = model.apply_model(x, t, c), plain.apply_model(x, t, c)
        assert rel_err(merged, expected) < 1e-5 and rel_err(merged, base) > 1e-2
        patch.set_weights([0.0])
        assert rel_err(model.apply_model(x, t, c), base) < 1e-6


OLD_DIFFUSERS = ("_lora.down.weight", "_lora.up.weight")  # diffusers' attention processors: to_q_lora.down.weight
# The same layer named by each format; diffusers' older names and the bare names some tools write.
SPELLINGS = [
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q", *OLD_DIFFUSERS),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0",
     "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_out", *OLD_DIFFUSERS),
    ("lora_unet_up_blocks_3_resnets_1_conv_shortcut", "up_blocks.3.resnets.1.conv_shortcut", ".lora.down.weight",
     ".lora.up.weight"),
    ("lora_unet_down_blocks_2_resnets_0_time_emb_proj", "down_blocks.2.resnets.0.time_emb_proj", ".lora_A.weight",
     ".lora_B.weight"),
    ("lora_te_text_model_encoder_layers_1_mlp_fc2", "text_encoder.text_model.encoder.layers.1.mlp.fc2",
     ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    ("lora_te_text_model_encoder_layers_1_self_attn_out_proj",
     "text_encoder.text_model.encoder.layers.1.self_attn.to_out", *OLD_DIFFUSERS),
    ("lora_te_text_model_encoder_layers_0_self_attn_v_proj",
     "base_model.model.text_encoder.text_model.encoder.layers.0.self_attn.v_proj", ".lora_A.weight", ".lora_B.weight"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te_encoder_layers_0_mlp_fc1", ".lora_down.weight",
     ".lora_up.weight"),
]


def test_every_spelling_of_a_layer_merges_alike(fresh, tmp_path):
    base = fresh()
    reference, other = {}, {}
    sizes = {"attn1_to_q": (32, 32, 0), "attn2_to_out_0": (64, 64, 0), "conv_shortcut": (32, 64, 1),
             "time_emb_proj": (64, 128, 0), "mlp_fc2": (32, 64, 0), "out_proj": (32, 32, 0), "v_proj": (32, 32, 0),
             "mlp_fc1": (64, 32, 0)}
    for seed, (kname, oname, down_end, up_end) in enumerate(SPELLINGS):
        out, inp, kernel = next(v for key, v in sizes.items() if kname.endswith(key))
        down, up = random_pair(out, inp, 4, kernel, seed=seed)
        reference.update(kohya(kname, down, up))
        other.update({f"{oname}{down_end}": down, f"{oname}{up_end}": up})
    a, b = fresh(), fresh()
    apply_loras(a, [(save(tmp_path / "kohya.safetensors", reference), 0.9)])
    patch = apply_loras(b, [(save(tmp_path / "other.safetensors", other), 0.9)])
    assert len(patch.touched) == len(SPELLINGS)
    assert same_state(a, b) == [] and len(same_state(a, base)) == len(SPELLINGS)


# kohya's SD v1 extraction names the UNet's layers by their CompVis paths (and A1111 reads them so).
COMPVIS_NAMES = {
    "lora_unet_down_blocks_0_resnets_0_conv1": "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_down_blocks_0_resnets_1_time_emb_proj": "lora_unet_input_blocks_2_0_emb_layers_1",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "lora_unet_input_blocks_3_0_op",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "lora_unet_input_blocks_1_1_proj_in",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "lora_unet_output_blocks_2_1_conv",  # no attention at the deepest level
    "lora_unet_up_blocks_2_upsamplers_0_conv": "lora_unet_output_blocks_8_2_conv",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2":
        "lora_unet_output_blocks_11_1_transformer_blocks_0_ff_net_2",
}


def test_compvis_named_kohya_layers_merge_as_their_diffusers_names(fresh, lora_dir, tmp_path):
    k = load_file(lora_dir / "lora-kohya.safetensors")
    diffusers_named, compvis_named = {}, {}
    for ours, theirs in COMPVIS_NAMES.items():
        for key in (key for key in k if key.split(".")[0] == ours):
            diffusers_named[key] = k[key]
            compvis_named[key.replace(ours, theirs)] = k[key]
    a, b = fresh(), fresh()
    apply_loras(a, [(save(tmp_path / "diffusers.safetensors", diffusers_named), 0.7)])
    patch = apply_loras(b, [(save(tmp_path / "compvis.safetensors", compvis_named), 0.7)])
    assert len(patch.touched) == len(COMPVIS_NAMES) and same_state(a, b) == []


def test_alpha_scales_and_a_linear_lora_fits_a_1x1_convolution(fresh, tmp_path):
    model = fresh()
    name, param = "down_blocks.0.attentions.1.proj_out", UNET + "input_blocks.2.1.proj_out.weight"  # (32, 32, 1, 1)
    down, up = random_pair(32, 32, 4, seed=5)  # linear-shaped, as SD 2.x-style trainers write
    w0 = model.state_dict()[param].double()
    cases = [  # (file tensors, safetensors metadata, scale)
        (kohya(f"lora_unet_{name.replace('.', '_')}", down, up), None, 1.0),  # alpha absent: alpha = rank
        (kohya(f"lora_unet_{name.replace('.', '_')}", down, up, alpha=1), None, 0.25),
        (peft(f"unet.{name}", down, up), None, 1.0),
        (peft(f"unet.{name}", down, up), {"lora_adapter_metadata": json.dumps(
            {"unet.r": 4, "unet.lora_alpha": 8})}, 2.0),
        (peft(f"unet.{name}", down, up), {"lora_adapter_metadata": json.dumps(
            {"unet.lora_alpha": 8, "unet.alpha_pattern": {"attentions.1.proj_out": 2}})}, 0.5),
        (peft(f"unet.{name}", down, up), {"lora_adapter_metadata": json.dumps(
            {"unet.lora_alpha": 8, "unet.use_rslora": True})}, 4.0),  # rsLoRA: alpha / sqrt(rank)
    ]
    for i, (tensors, metadata, scale) in enumerate(cases):
        patch = apply_loras(model, [(save(tmp_path / f"{i}.safetensors", tensors, metadata), 0.5)], keep_original=True)
        expected = w0 + 0.5 * update(down, up, scale, w0.shape)
        assert rel_err(model.state_dict()[param].double(), expected) < 1e-6, i
        patch.restore()


def test_hashes_are_the_files_sha256_and_a1111s_short_hash(fresh, lora_dir):
    path = lora_dir / "lora-kohya.safetensors"
    data = path.read_bytes()
    patch = apply_loras(fresh(), [(path, 1.0)])
    info = patch.files[0]
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    header = 8 + int.from_bytes(data[:8], "little")
    assert info.short_hash == hashlib.sha256(data[header:]).hexdigest()[:12]
    assert info.name == "lora-kohya" and info.path == path


def test_a_pickled_lora_is_read_like_its_safetensors_copy(fresh, lora_dir, tmp_path):
    tensors = load_file(lora_dir / "lora-kohya.safetensors")
    torch.save(tensors, tmp_path / "style.pt")
    a, b = fresh(), fresh()
    apply_loras(a, [(lora_dir / "lora-kohya.safetensors", 0.6)])
    patch = apply_loras(b, [(tmp_path / "style.pt", 0.6)])
    assert same_state(a, b) == []
    assert patch.files[0].short_hash == hashlib.sha256((tmp_path / "style.pt").read_bytes()).hexdigest()[:12]


def test_a_half_precision_model_merges_as_the_float_merge_rounded(fresh, lora_dir):
    import numpy as np

    files = [lora_dir / "lora-kohya.safetensors", lora_dir / "lora-peft.safetensors"]
    full, half = fresh(), fresh().half()
    apply_loras(full, [(files[0], 0.8), (files[1], 0.5)])
    patch = load_loras(half, [(files[0], 0.0), (files[1], 0.0)])
    patch.set_weights(np.array([0.8, 0.5], dtype=np.float32))  # a schedule's numbers may be numpy's
    for name, _ in patch.touched:
        ours, rounded = half.get_parameter(name), full.get_parameter(name).half()
        assert ours.dtype == torch.float16
        # float16 rounds to 1/1024 of a value; sums of two terms may be one rounding further
        assert float((ours.float() - rounded.float()).abs().max()) <= 2e-3 * (1 + float(rounded.abs().max())), name
    half.float()
    with pytest.raises(RuntimeError, match="load them after moving the model"):
        patch.set_weights([0.1, 0.1])
