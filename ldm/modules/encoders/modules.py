"""The text encoders of Stable Diffusion, frozen: CLIP ViT-L/14's text transformer (SD v1,
``FrozenCLIPEmbedder``) and OpenCLIP ViT-H/14's (SD 2.x, ``FrozenOpenCLIPEmbedder``)."""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.clip_tokenizer import SimpleTokenizer

# The text tower of openai/clip-vit-large-patch14, as SD v1 uses it.
VIT_L14_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}


class FrozenCLIPEmbedder(nn.Module):
    """Prompts -> CLIP text-transformer states, (B, max_length, hidden).

    The transformer is built from its configuration with random weights (nothing is downloaded);
    the checkpoint supplies the weights as `cond_stage_model.transformer.*`.
    version: the Hugging Face name real configs carry, kept for reference only.
    device: accepted for config compatibility; tokens go to wherever the weights are.
    text_config: overrides of the ViT-L/14 text configuration (e.g. a smaller test model).
    """

    def __init__(
        self,
        version="openai/clip-vit-large-patch14",
        device=None,
        max_length=77,
        text_config=None,
        **ignored,
    ):
        super().__init__()
        self.version = version
        self.max_length = max_length
        self.tokenizer = SimpleTokenizer()
        config = CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **dict(text_config or {})})
        self.transformer = CLIPTextModel(config)
        self.freeze()

    def freeze(self):
        """Puts the transformer in eval mode and stops gradients to its weights."""
        self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def computed_buffers(self) -> dict:
        """``position_ids``, (1, positions) int64 on the CPU: a buffer transformers computes and
        no longer stores (``ldm.util.fill_computed_buffers`` sets it after a meta-device build)."""
        return {f"transformer.{name}": torch.arange(buffer.shape[-1], device="cpu").reshape(buffer.shape)
                for name, buffer in self.transformer.named_buffers() if name.endswith("position_ids")}

    def tokenize(self, text):
        """text: list of B prompts -> (B, max_length) int64 token ids."""
        return self.tokenizer.tokenize(text, context_length=self.max_length)

    def forward(self, text):
        """text: list of B prompts -> (B, max_length, hidden) last hidden states (after final layer norm)."""
        tokens = self.tokenize(text).to(self.transformer.device)
        return self.transformer(input_ids=tokens).last_hidden_state

    def encode(self, text):
        """Same as forward: (B, max_length, hidden) conditioning for a list of B prompts."""
        return self(text)


# The text tower of OpenCLIP ViT-H/14 (laion2b_s32b_b79k), as SD 2.x uses it.
VIT_H14_TEXT_CONFIG = {"width": 1024, "heads": 16, "layers": 24, "context_length": 77, "vocab_size": 49408,
                       "mlp_ratio": 4.0}
OPENCLIP_LAYERS = ("last", "penultimate")


class ResidualAttentionBlock(nn.Module):
    """OpenCLIP's pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Parameter names are OpenCLIP's: ``attn.in_proj_weight``/``in_proj_bias`` (q, k, v stacked, as
    ``nn.MultiheadAttention``), ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj``; GELU (erf) in the MLP.
    """

    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"text tower width {width} does not split into {heads} heads")
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.attn.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.attn.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def attention(self, x):
        """Causal multi-head self-attention: token i sees tokens 0..i. x: (B, N, width) -> same."""
        b, n, width = x.shape
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn.out_proj(out.transpose(1, 2).reshape(b, n, width))

    def forward(self, x):
        """x: (B, N, width) -> (B, N, width)."""
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTextTower(nn.Module):
    """The text half of an OpenCLIP model, under OpenCLIP's names: ``token_embedding``,
    ``positional_embedding``, ``transformer.resblocks.N``, ``ln_final``, ``text_projection``,
    ``logit_scale`` (the last two are stored in checkpoints and not used for conditioning)."""

    def __init__(self, width, heads, layers, context_length, vocab_size, mlp_ratio=4.0, embed_dim=None):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio)
                                                   for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, width if embed_dim is None else embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))


class FrozenOpenCLIPEmbedder(nn.Module):
    """Prompts -> OpenCLIP text-transformer states, (B, max_length, width): SD 2.x's text encoder.

    Built offline from the ViT-H/14 text-tower configuration (``text_cfg`` overrides its
    ``width``, ``heads``, ``layers``, ``context_length``, ``vocab_size``, ``mlp_ratio``,
    ``embed_dim``); nothing is downloaded: the checkpoint supplies the weights as
    ``cond_stage_model.model.*`` and the BPE vocabulary is the one shipped with ldm.
    layer: "last" (all blocks) or "penultimate" (all but the last block, as SD 2.x); either way
    ``ln_final`` follows, as Stability-AI's code does. Tokens are padded with 0 (OpenCLIP).
    arch, version: the OpenCLIP names real configs carry, kept for reference only.
    device: accepted for config compatibility; tokens go to wherever the weights are.
    """

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device="cuda", max_length=77, freeze=True,
                 layer="last", text_cfg=None, **ignored):
        super().__init__()
        if layer not in OPENCLIP_LAYERS:
            raise ValueError(f"layer {layer!r}: use one of {OPENCLIP_LAYERS}")
        config = {**VIT_H14_TEXT_CONFIG, **dict(text_cfg or {})}
        if max_length > config["context_length"]:
            raise ValueError(f"max_length {max_length} exceeds the text tower's context of {config['context_length']}")
        self.arch, self.version, self.layer = arch, version, layer
        self.layer_idx = OPENCLIP_LAYERS.index(layer)
        self.max_length = max_length
        self.tokenizer = SimpleTokenizer()
        self.model = OpenCLIPTextTower(**config)
        if freeze:
            self.freeze()

    def freeze(self):
        """Puts the tower in eval mode and stops gradients to its weights."""
        self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text):
        """text: list of B prompts -> (B, max_length) int64 token ids, padded with 0."""
        return self.tokenizer.tokenize(text, context_length=self.max_length, pad_token=0)

    def encode_with_transformer(self, tokens):
        """tokens (B, N) -> (B, N, width): the chosen layer's states after ``ln_final``."""
        model = self.model
        x = model.token_embedding(tokens) + model.positional_embedding[: tokens.shape[1]]
        blocks = model.transformer.resblocks
        for block in blocks[: len(blocks) - self.layer_idx]:
            x = block(x)
        return model.ln_final(x)

    def forward(self, text):
        """text: list of B prompts -> (B, max_length, width) conditioning."""
        return self.encode_with_transformer(self.tokenize(text).to(self.model.token_embedding.weight.device))

    def encode(self, text):
        """Same as forward: (B, max_length, width) conditioning for a list of B prompts."""
        return self(text)
