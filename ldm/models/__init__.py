"""Top-level models: the latent diffusion model and its autoencoder."""
