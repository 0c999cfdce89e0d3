"""The autoencoder's posterior: a diagonal Gaussian over latents."""
import torch


class DiagonalGaussianDistribution:
    """A diagonal Gaussian whose mean and log-variance are the two channel halves of `parameters`.

    parameters: (B, 2C, h, w) -> mean, logvar, std, var: (B, C, h, w). The log-variance is clamped
    to [-30, 20] as in CompVis.
    """

    def __init__(self, parameters):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """A draw mean + std * N(0, 1), shape (B, C, h, w).

        Without a generator the noise comes from the global CPU RNG (as upstream, so seeded runs
        give the same latents on every device); with one, from it on its device.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self):
        """The most likely latent: the mean, (B, C, h, w)."""
        return self.mean
