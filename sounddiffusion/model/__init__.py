"""The Stable Diffusion model itself: loading weights into it and changing them (LoRA)."""
