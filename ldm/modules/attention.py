"""The UNet's transformer: cross-attention of image tokens over the text conditioning.

Parameter names follow CompVis (`to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2`, ...),
so SD v1 checkpoints load unchanged.

Attention runs through `torch.nn.functional.scaled_dot_product_attention` ("sdpa"). The upstream
formula, softmax(q k^T * scale) v with the similarity matrix computed in the tensors' own dtype
("einsum"), can be selected per model with `set_attention_backend`, e.g. to reproduce the original
code path in a benchmark.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import zero_module

ATTENTION_BACKENDS = ("sdpa", "einsum")


def einsum_attention(q, k, v, scale):
    """CompVis's attention: softmax(q k^T * scale) v, all in the inputs' dtype.

    q: (B, H, N, D); k, v: (B, H, M, D); scale: the logit factor (D ** -0.5). Returns (B, H, N, D).
    """
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    return torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)


def set_attention_backend(model, backend):
    """Selects how every CrossAttention inside `model` computes attention: "sdpa" or "einsum"."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of {ATTENTION_BACKENDS}")
    for module in model.modules():
        if isinstance(module, CrossAttention):
            module.attention_backend = backend


class CrossAttention(nn.Module):
    """Multi-head attention of query tokens over context tokens (self-attention without context).

    query_dim: width of x; context_dim: width of the context (defaults to query_dim);
    heads x dim_head: the inner width of q, k and v.
    """

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.scale = dim_head**-0.5
        self.attention_backend = "sdpa"
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t):
        """(B, N, H*D) -> (B, H, N, D)."""
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x, context=None):
        """x: (B, N, query_dim); context: (B, M, context_dim) or None. Returns (B, N, query_dim)."""
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        if self.attention_backend == "einsum":
            out = einsum_attention(q, k, v, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU projection: proj(x) split in halves (a, gate), returns a * gelu(gate).

    (..., dim_in) -> (..., dim_out).
    """

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's gated MLP: GEGLU to mult*dim, then a linear layer back to dim.

    (..., dim) -> (..., dim). The Sequential keeps CompVis's keys `net.0.proj` and `net.2`.
    """

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention over the context, gated MLP.

    dim: token width; n_heads x d_head: attention inner width; context_dim: width of the context.
    """

    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        """x: (B, N, dim); context: (B, M, context_dim). Returns (B, N, dim)."""
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a context sequence.

    GroupNorm (32 groups, eps 1e-6), projection to n_heads*d_head channels, `depth` transformer
    blocks over the H*W tokens, projection back, plus the input (residual). The projections
    (`proj_in`, `proj_out`) are 1x1 convolutions (SD v1) or, with use_linear (SD 2.x's
    `use_linear_in_transformer`), linear layers applied to the tokens.
    """

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None, use_linear=False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim)
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x, context=None):
        """x: (B, C, H, W); context: (B, M, context_dim). Returns (B, C, H, W)."""
        b, _, h, w = x.shape
        tokens = self.norm(x)
        if self.use_linear:
            tokens = self.proj_in(tokens.flatten(2).transpose(1, 2))
        else:
            tokens = self.proj_in(tokens).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        if self.use_linear:
            return self.proj_out(tokens).transpose(1, 2).reshape(b, -1, h, w) + x
        return self.proj_out(tokens.transpose(1, 2).reshape(b, -1, h, w)) + x
