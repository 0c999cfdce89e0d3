"""The denoising UNet, the autoencoder's encoder/decoder networks and their helpers."""
