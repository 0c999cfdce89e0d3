"""The model: loading, the Engine that samples, conditioning, CUDA graphs."""
