"""The denoising UNet of Stable Diffusion, with CompVis's (OpenAI guided-diffusion's) parameter names.

State-dict layout: `time_embed.{0,2}`, `input_blocks.{i}.{j}`, `middle_block.{0,1,2}`,
`output_blocks.{i}.{j}`, `out.{0,2}`; ResBlocks hold `in_layers`, `emb_layers`, `out_layers`,
`skip_connection`; attention layers are SpatialTransformers (SD) or AttentionBlocks.
LCM-distilled UNets also hold `time_embedding.cond_proj` (see UNetModel's time_cond_proj_dim).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    conv_nd,
    guidance_scale_embedding,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class ResBlock(nn.Module):
    """Residual block whose hidden activations are shifted by a projection of the timestep embedding.

    channels -> out_channels (defaults to channels); emb_channels: width of the timestep embedding.
    The skip connection is the identity, or a 1x1 convolution when the width changes.
    """

    def __init__(self, channels, emb_channels, dropout=0.0, out_channels=None, dims=2):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, out_channels, 1)

    def forward(self, x, emb):
        """x: (B, channels, *spatial); emb: (B, emb_channels). Returns (B, out_channels, *spatial)."""
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        h = h + emb_out.reshape(*emb_out.shape, *((1,) * (h.dim() - 2)))
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over the positions of a feature map (UNets without a SpatialTransformer).

    Heads: `num_heads`, or channels // num_head_channels when num_head_channels != -1.
    The `qkv` projection is laid out per head as [q | k | v] ("legacy" order of CompVis).
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        """x: (B, C, *spatial) -> (B, C, *spatial)."""
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x)).reshape(b, self.num_heads, 3 * c // self.num_heads, -1)
        q, k, v = qkv.transpose(2, 3).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Halves the spatial size: a stride-2 3x3 convolution (`op`), or 2x2 average pooling."""

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=2, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)

    def forward(self, x):
        """x: (B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.op(x)


class Upsample(nn.Module):
    """Doubles the spatial size by nearest-neighbour repetition, then a 3x3 convolution (`conv`)."""

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x):
        """x: (B, C, H, W) -> (B, C, 2H, 2W)."""
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x, emb, context=None):
        """x: (B, C, H, W); emb: (B, E); context: (B, M, context_dim) or None."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def attention_heads(ch, num_heads, num_head_channels, legacy, use_spatial_transformer):
    """(num_heads, dim_head) of an attention layer over `ch` channels, exactly as CompVis derives them.

    A fixed head width (num_head_channels != -1) sets the head count to ch // num_head_channels;
    otherwise dim_head = ch // num_heads. `legacy` then overrides dim_head: ch // num_heads for
    transformers, num_head_channels (possibly -1, meaning "use num_heads") for AttentionBlocks.
    """
    if num_head_channels == -1:
        dim_head = ch // num_heads
    else:
        num_heads = ch // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = ch // num_heads if use_spatial_transformer else num_head_channels
    return num_heads, dim_head


class UNetModel(nn.Module):
    """The noise-prediction UNet: (noisy latent, timestep, context) -> predicted noise.

    Levels of `channel_mult` widen model_channels; each level has `num_res_blocks` ResBlocks on
    the way down (num_res_blocks + 1 on the way up, fed the skip activations), with an attention
    layer after each when the downsampling factor is in `attention_resolutions` (1, 2, 4, ...).
    With use_spatial_transformer the attention is a SpatialTransformer of `transformer_depth`
    blocks over `context_dim`-wide context (768 for SD v1, 1024 for SD 2.x), with linear instead of
    1x1-convolution projections when use_linear_in_transformer (SD 2.x); otherwise a self-attention
    AttentionBlock. Heads: `num_heads` of ch // num_heads channels, or heads of a fixed
    `num_head_channels` (64 for SD 2.x), see attention_heads.

    image_size, use_checkpoint and use_fp16 are accepted for config compatibility: the network is
    size-agnostic, inference needs no gradient checkpointing, and it computes in the dtype of its
    weights (SD 2.x configs say use_fp16: True; the precision is the loader's choice here). Spatial sizes must be divisible by 2 ** (len(channel_mult) - 1).

    time_cond_proj_dim (LCM-distilled UNets such as LCM Dreamshaper: 256): the UNet also embeds
    the guidance scale w. ``time_embedding.cond_proj``, a Linear(time_cond_proj_dim ->
    model_channels, no bias), maps ``guidance_scale_embedding(w - 1)`` onto the sinusoidal timestep
    embedding before ``time_embed`` (diffusers' ``time_cond_proj_dim``; converted checkpoints keep
    diffusers' key ``model.diffusion_model.time_embedding.cond_proj.weight``).
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0.0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=-1,
        num_head_channels=-1,
        use_spatial_transformer=False,
        transformer_depth=1,
        context_dim=None,
        use_linear_in_transformer=False,
        legacy=True,
        time_cond_proj_dim=None,
    ):
        super().__init__()
        if dims != 2:
            raise ValueError(f"dims={dims}: only 2-D UNets are supported")
        if num_classes is not None:
            raise ValueError("class-conditional UNets (num_classes) are not supported")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("a UNet with use_spatial_transformer needs a context_dim")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels

        def attention_layer(ch):
            heads, dim_head = attention_heads(ch, num_heads, num_head_channels, legacy, use_spatial_transformer)
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim,
                                          use_linear=use_linear_in_transformer)
            return AttentionBlock(ch, num_heads=heads, num_head_channels=dim_head)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        self.time_cond_proj_dim = time_cond_proj_dim
        if time_cond_proj_dim is not None:
            # named as the checkpoints converted from diffusers' LCM UNets name it
            self.time_embedding = nn.ModuleDict(
                {"cond_proj": linear(time_cond_proj_dim, model_channels, bias=False)})

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_embed_dim, dropout, out_channels=mult * model_channels, dims=dims)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention_layer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, dropout, dims=dims),
            attention_layer(ch),
            ResBlock(ch, time_embed_dim, dropout, dims=dims),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = skip_channels.pop()
                layers = [
                    ResBlock(ch + skip_ch, time_embed_dim, dropout, out_channels=model_channels * mult, dims=dims)
                ]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention_layer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )

    def forward(self, x, timesteps, context=None, guidance_scale=None):
        """Predicts the noise in x.

        x: (B, in_channels, H, W); timesteps: (B,) diffusion steps in [0, 1000);
        context: (B, M, context_dim) conditioning (e.g. (B, 77, 768) CLIP states) or None;
        guidance_scale: w, a number or a (B,) tensor, for UNets with ``time_cond_proj_dim``:
        time_embed(timestep_embedding(t) + cond_proj(guidance_scale_embedding(w - 1))). Without
        it such a UNet leaves the projection out, as diffusers does without ``timestep_cond``.
        Returns (B, out_channels, H, W) in x's dtype.
        """
        dtype = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(timesteps, self.model_channels).to(dtype)
        if guidance_scale is not None:
            t_emb = t_emb + self._guidance_projection(guidance_scale, x.shape[0], x.device).to(dtype)
        emb = self.time_embed(t_emb)
        if context is not None:
            context = context.to(dtype)
        h = x.to(dtype)
        skips = []
        for module in self.input_blocks:
            h = self.run_block(module, h, emb, context)
            skips.append(h)
        h = self.run_block(self.middle_block, h, emb, context)
        for module in self.output_blocks:
            h = self.run_block(module, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)

    def _guidance_projection(self, guidance_scale, batch_size, device):
        """cond_proj(guidance_scale_embedding(w - 1)): (B, model_channels)."""
        if self.time_cond_proj_dim is None:
            raise ValueError("this UNet has no guidance embedding (time_cond_proj_dim): pass guidance_scale "
                             "only to LCM-distilled UNets, guide the others with an unconditional batch")
        if isinstance(guidance_scale, torch.Tensor):
            offset = guidance_scale.to(device=device, dtype=torch.float32).reshape(-1) - 1.0
        else:  # w - 1 in double precision first, as diffusers' pipelines compute it
            offset = torch.tensor([float(guidance_scale) - 1.0], dtype=torch.float32, device=device)
        embedding = guidance_scale_embedding(offset.expand(batch_size), self.time_cond_proj_dim)
        projection = self.time_embedding["cond_proj"]
        return projection(embedding.to(projection.weight.dtype))

    def run_block(self, block, h, emb, context):
        """One of the input, middle or output blocks on ``h``: its output, after its forward
        hooks (those of network bending among them). A subclass may look at it here."""
        return block(h, emb, context)
