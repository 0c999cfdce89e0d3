"""Jobs over many inputs: image jobs, batches, Ray, the manifest."""
