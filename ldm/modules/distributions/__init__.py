"""Probability distributions over latents."""
