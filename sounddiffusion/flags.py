"""Command-line flags as data: a :class:`Flag` says what one option is called, what it takes and
what its help says; a :class:`FlagGroup` gathers the flags of one concern.

A feature declares its flags beside the settings they fill, and ``sounddiffusion.cli`` turns
them into argparse options (only the command-line layer imports argparse), so a flag that
several entry points share is defined once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

SCHEDULE_HELP = "; a number or a schedule over the music (README: Music-reactive control)"
"""Ends the help of every flag that takes a schedule."""


@dataclass(frozen=True)
class Flag:
    """One option: ``names`` (``("--zoom",)``), its ``help``, and argparse's ``default``, ``type``,
    ``metavar``, ``choices``, ``action`` (``"store_true"``, ``"append"``) and ``dest`` where set."""

    names: tuple[str, ...]
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple | None = None
    action: str | None = None
    dest: str | None = None

    def argparse_options(self) -> dict[str, Any]:
        """The keyword arguments of ``add_argument`` for this flag (unset ones left out)."""
        options = {"help": self.help, "default": self.default, "type": self.type, "metavar": self.metavar,
                   "choices": self.choices, "action": self.action, "dest": self.dest}
        return {name: value for name, value in options.items() if value is not None or name == "default"}


@dataclass(frozen=True)
class FlagGroup:
    """The flags of one concern, shown together in ``--help`` under ``title`` (and ``description``)."""

    title: str
    flags: tuple[Flag, ...] = field(default_factory=tuple)
    description: str | None = None
