"""Exceptions for mistakes a user can fix.

Every entry point turns a :class:`UserError` into one line on stderr and exit status 2.
The message must say what is wrong and what to do about it.
"""


class UserError(Exception):
    """A problem with the user's input, files or machine, with a message that says what to do.

    ``permanent``: True when the input itself is at fault, so the same input fails the same way
    on every try (a file that is not a sound): a batch job skips such an item until the input
    changes. False (the default) when the cause may pass or lies outside the input (a render
    lock held by another process, a leftover render with other settings, a full disk): a
    batch job tries such an item again on its next run."""

    permanent = False


class AudioError(UserError):
    """An audio file is missing, unreadable, not audio, or empty."""

    permanent = True


class AudioAccessError(AudioError):
    """An audio file that exists cannot be opened now (no permission, an I/O error): may pass."""

    permanent = False


class ParameterError(UserError, ValueError):
    """A command-line value is out of range."""


class ModelError(UserError):
    """The checkpoint or config cannot be used (missing, corrupt, another architecture)."""


class OutputError(UserError):
    """An output cannot be written (folder not creatable, not writable, disk full)."""


class PromptFileError(UserError):
    """A prompt file has a line that cannot be read."""


class DeviceError(UserError):
    """The requested device is unavailable or out of memory."""


class ScheduleError(ParameterError):
    """A per-frame schedule (a number, an expression or keyframes) cannot be read or evaluated.

    The message is one line that names the flag, quotes the text and gives the 1-based column
    (or the frame) and what was expected there."""

