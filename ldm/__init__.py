"""Stable Diffusion v1 with the module paths and parameter names of CompVis's `ldm` package."""
