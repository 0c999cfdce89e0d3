"""Video frames: the frame loop's building blocks (camera motion, ...)."""
