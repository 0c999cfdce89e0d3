"""The autoencoder's convolutional Encoder and Decoder, with CompVis's parameter names.

Layout: `conv_in`, `down.{i}.block.{j}` / `down.{i}.attn.{j}` / `down.{i}.downsample.conv`,
`mid.block_1`, `mid.attn_1`, `mid.block_2`, `up.{i}.block.{j}` / `up.{i}.upsample.conv`,
`norm_out`, `conv_out`. Each level but the last halves (encoder) or doubles (decoder) H and W.
"""
import torch.nn.functional as F
from torch import nn


def Normalize(in_channels):
    """The autoencoder's normalization: 32-group GroupNorm, eps 1e-6, with affine parameters."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-3x3-conv stages plus a skip (a 1x1 `nin_shortcut` when widths differ).

    (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels, out_channels=None, dropout=0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convs `q`, `k`, `v`, `proj_out`.

    (B, C, H, W) -> (B, C, H, W), residual.
    """

    def __init__(self, in_channels):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x):
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, 1, H*W, C): one head whose tokens are the pixels
        q, k, v = (conv(normed).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 `conv` after zero-padding right and bottom by one pixel."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        # asymmetric padding (right/bottom only), as the CompVis weights were trained with
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition, then a 3x3 `conv`."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(block_in, dropout):
    """The bottleneck: ResnetBlock, self-attention, ResnetBlock."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout)
    mid.attn_1 = AttnBlock(block_in)
    mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout)
    return mid


class Encoder(nn.Module):
    """Image -> latent moments: (B, in_channels, H, W) -> (B, 2*z_channels (double_z) or z_channels, H/f, W/f)
    with f = 2 ** (len(ch_mult) - 1).

    ch: base width; ch_mult: width multiplier per level; num_res_blocks: ResnetBlocks per level;
    attn_resolutions: feature-map sizes (relative to `resolution`) that get self-attention.
    out_ch is the Decoder's and accepted here because both receive the same ddconfig.
    """

    def __init__(
        self,
        *,
        ch,
        ch_mult,
        num_res_blocks,
        attn_resolutions,
        in_channels,
        resolution,
        z_channels,
        dropout=0.0,
        double_z=True,
        out_ch=None,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * mult, dropout=dropout))
                block_in = ch * mult
                if curr_res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if i_level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = _mid_block(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x):
        h = self.conv_in(x)
        for down in self.down:
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn):
                    h = down.attn[i_block](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image: (B, z_channels, h, w) -> (B, out_ch, h*f, w*f) with f = 2 ** (len(ch_mult) - 1).

    Mirrors the Encoder with num_res_blocks + 1 ResnetBlocks per level. `up` is indexed like the
    encoder's `down` (level 0 is the full resolution) although it runs from the last level to 0.
    in_channels and double_z are the Encoder's and accepted because both receive the same ddconfig.
    """

    def __init__(
        self,
        *,
        ch,
        out_ch,
        ch_mult,
        num_res_blocks,
        attn_resolutions,
        resolution,
        z_channels,
        dropout=0.0,
        in_channels=None,
        double_z=None,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_block(block_in, dropout)
        up_levels = []
        for i_level in reversed(range(len(ch_mult))):
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, ch * ch_mult[i_level], dropout=dropout))
                block_in = ch * ch_mult[i_level]
                if curr_res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            up_levels.insert(0, up)
        self.up = nn.ModuleList(up_levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in reversed(self.up):
            for i_block, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i_block](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
