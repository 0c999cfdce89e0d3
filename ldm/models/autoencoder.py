"""The KL-regularized autoencoder that maps images to Stable Diffusion's latents and back."""
import pytorch_lightning as pl
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
