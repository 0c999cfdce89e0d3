"""--help of every entry point names only flags that entry point has (help texts shared between
audio2video and live.py must not send a live.py user to --prompt_file, --init-img or --sections)."""
import re

import pytest

from conftest import ENTRY_POINTS, load_module

# Not flags: the prompt-file syntax 'TIME prompt --neg negative' that --negative_prompt's help quotes.
NOT_FLAGS = {"--neg"}


def flags_named_in_help(parser) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", parser.format_help()))


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_help_names_only_the_tools_own_flags(name):
    parser = load_module(ENTRY_POINTS[name], f"help_flags_{name}").build_parser()
    own = {option for action in parser._actions for option in action.option_strings}
    assert flags_named_in_help(parser) - own - NOT_FLAGS == set()


def test_audio2video_keeps_the_clauses_about_its_files():
    parser = load_module(ENTRY_POINTS["audio2video"], "help_flags_audio2video_files").build_parser()
    flat = " ".join(parser.format_help().split())
    for clause in ("a --prompt_file line 'TIME prompt --neg negative' has its own", "frame 0's (or --init-img's)",
                   "section and section_start with --sections"):
        assert clause in flat, clause
