"""Conditioning encoders: the CLIP text encoder and its tokenizer."""
