"""Objects whose unpickling runs code (not a test module): the payloads the checkpoint tests hide
in ``.ckpt`` files. Each one, if ever unpickled, creates the file ``marker``; the tests assert it
never appears."""
import builtins
import os


class RunsShell:
    """Unpickling runs ``touch MARKER`` through ``os.system``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsExec:
    """Unpickling runs Python through ``builtins.exec``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


PAYLOADS = {"os.system": RunsShell, "builtins.exec": RunsExec}
