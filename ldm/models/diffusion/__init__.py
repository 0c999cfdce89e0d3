"""The latent diffusion model and its samplers."""
