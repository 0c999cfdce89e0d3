"""The text encoder of Stable Diffusion v1: CLIP ViT-L/14's text transformer, frozen."""
import torch
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
