"""The exceptions of the ldm package (kept apart so that every ldm module can raise them)."""


class CheckpointError(Exception):
    """A checkpoint file that cannot be used: missing, unreadable, or not fitting the config."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that asks to call code able to run commands; refused before anything ran."""
