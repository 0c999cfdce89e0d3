"""The KL-regularized autoencoder that maps images to Stable Diffusion's latents and back."""
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(pl.LightningModule):
    """Image <-> latent autoencoder (inference side of CompVis's AutoencoderKL).

    ddconfig: the Encoder/Decoder arguments (must have double_z true); embed_dim: latent channels.
    lossconfig, image_key and monitor are training settings, accepted and not used; weights are
    loaded by the caller (ldm.util), so ckpt_path must be unset.
    """

    def __init__(
        self,
        ddconfig,
        embed_dim,
        lossconfig=None,
        ckpt_path=None,
        ignore_keys=(),
        image_key="image",
        monitor=None,
        **ignored,
    ):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        if ckpt_path is not None:
            raise ValueError(
                f"ckpt_path={ckpt_path!r} in the first-stage config is not supported; "
                "load the whole model's weights with ldm.util.load_model_from_config"
            )
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):
        """x: (B, 3, H, W) image in [-1, 1] -> posterior over (B, embed_dim, H/f, W/f) latents.

        f = 2 ** (len(ch_mult) - 1), 8 for Stable Diffusion.
        """
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z: (B, embed_dim, h, w) latent -> (B, 3, f*h, f*w) image, nominally in [-1, 1] (unclamped)."""
        return self.decoder(self.post_quant_conv(z))


# Orthonormal luminance / colour-opponent transform of RGB: the latent's first three channels. Plain
# numbers, not a tensor: this module may first be imported inside torch.device("meta") (a checkpoint
# model built without memory), which would make a module-level tensor a meta tensor for good.
_OPPONENT = ((1 / 3**0.5, 1 / 3**0.5, 1 / 3**0.5),
             (1 / 2**0.5, 0.0, -1 / 2**0.5),
             (1 / 6**0.5, -2 / 6**0.5, 1 / 6**0.5))


class BlockMeanAutoencoder(nn.Module):
    """The ``--demo`` model's autoencoder: hand-designed, no weights, reconstructs pictures.

    encode: the mean colour of each ``factor`` x ``factor`` block (as luminance and two
    colour-opponent channels) and, as the 4th channel, the amount of unsharp masking that best
    restores the block's detail (least squares). decode: a bicubic upsampling of the colours,
    sharpened by that amount. decode(encode(x)) loses only detail finer than the blocks: about
    10/255 mean absolute error on photographs at 256x256, 5-8/255 at 512x512.

    ``scale_factor`` is the LatentDiffusion's: encode divides by it, so that the diffusion latents
    (``scale_factor * z``) are the channels times ``latent_scale`` (luminance in [-1.7, 1.7]
    times it). Shapes: x ``(B, 3, H, W)`` in [-1, 1] <-> z ``(B, 4, H / factor, W / factor)``.
    """

    def __init__(self, factor=8, scale_factor=0.18215, latent_scale=1.0, blur_sigma=1.5, embed_dim=4, **ignored):
        super().__init__()
        if embed_dim != 4:
            raise ValueError(f"BlockMeanAutoencoder makes 4 latent channels, not embed_dim={embed_dim}")
        self.factor, self.embed_dim = factor, embed_dim
        self.scale_factor, self.latent_scale = scale_factor, latent_scale
        radius = int(3 * blur_sigma + 0.5)
        kernel = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * blur_sigma**2))
        self.register_buffer("blur_kernel", kernel / kernel.sum(), persistent=False)
        self.register_buffer("opponent", torch.tensor(_OPPONENT), persistent=False)

    def encode(self, x):
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of ``factor`` -> a posterior with no
        spread over (B, 4, H/factor, W/factor) latents (``mode()`` and ``sample()`` agree)."""
        pixels = x.float()
        colours = F.avg_pool2d(pixels, self.factor)
        base = self._upsample(colours)
        detail = base - self._blur(base)
        gain = (F.avg_pool2d(((pixels - base) * detail).sum(1, keepdim=True), self.factor)
                / F.avg_pool2d(detail.square().sum(1, keepdim=True), self.factor).clamp_min(1e-4))
        latent = torch.cat([torch.einsum("oc,bchw->bohw", self.opponent, colours),
                            (gain.clamp(-1.0, 5.0) - 1.0) / 2.0], dim=1)
        spread = torch.full_like(latent, -30.0)  # log-variance: deterministic
        z = latent * (self.latent_scale / self.scale_factor)
        return DiagonalGaussianDistribution(torch.cat([z, spread], dim=1).to(x.dtype))

    def decode(self, z):
        """z: (B, 4, h, w) latent -> (B, 3, factor*h, factor*w) picture, nominally in [-1, 1]."""
        latent = z.float() * (self.scale_factor / self.latent_scale)
        colours = torch.einsum("oc,bohw->bchw", self.opponent, latent[:, :3])  # the inverse: transposed
        base = self._upsample(colours)
        gain = self._upsample(1.0 + 2.0 * latent[:, 3:])
        return (base + gain * (base - self._blur(base))).to(z.dtype)

    def _upsample(self, z):
        return F.interpolate(z, scale_factor=self.factor, mode="bicubic", align_corners=False)

    def _blur(self, x):
        """A separable Gaussian blur with edge replication, (B, C, H, W) -> same."""
        k, c, r = self.blur_kernel.to(x.dtype), x.shape[1], self.blur_kernel.numel() // 2
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
