"""Command-line plumbing shared by every entry point.

- The argparse groups that several scripts share are defined here, once.
- :func:`validate_args` checks the numbers users pass, naming the offending value.
- :func:`run` wraps an entry point: user mistakes become one line on stderr and exit status 2,
  ``--debug`` shows the full traceback instead.

Exit statuses: 0 done; 2 a user mistake (one line on stderr, nothing rendered);
:data:`EXIT_SKIPPED` (3) a batch finished but skipped some inputs (each one named on stderr);
130 interrupted (Ctrl-C or SIGTERM; finished outputs are kept).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from typing import Callable, Sequence, TypeVar

from sounddiffusion.errors import DeviceError, OutputError, ParameterError, UserError
from sounddiffusion.flags import SCHEDULE_HELP, FlagGroup
from sounddiffusion.logs import configure_logging
from sounddiffusion.settings import (CRF_RANGE, DEFAULT_SIZE, DEMO_SIZE, MAX_FPS, JobSettings, ModelSettings,
                                     pick_sampler)

log = logging.getLogger("sounddiffusion")
Settings = TypeVar("Settings", bound=JobSettings)

EXIT_USER_ERROR = 2
EXIT_SKIPPED = 3
"""A batch run (a folder or list of sounds) that wrote its results but skipped some inputs."""
EXIT_INTERRUPTED = 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's line breaks.

    "(default: X)" is added only where it tells something: not when the help text already speaks
    of its default, and not for the defaults None, False and "" (an unset option, an off switch,
    no text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is False or default == ""
                or default is argparse.SUPPRESS or action.required):
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (an unknown flag, ``--fps abc``) are one line on stderr, exit status 2,
    like every other user mistake, instead of the usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def make_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description, epilog=epilog,
                            formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks and debug logging")
    return parser


def add_flag_group(parser: argparse.ArgumentParser, group: FlagGroup) -> None:
    """The flags of ``group`` (declared as data beside the settings they fill) as one argparse group."""
    g = parser.add_argument_group(group.title, group.description)
    for flag in group.flags:
        g.add_argument(*flag.names, **flag.argparse_options())


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """--prompt or --from-file, as CompVis's txt2img and img2img."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--prompt", default="a painting of a virus monster playing guitar",
                   help="the prompt to render")
    g.add_argument("--from-file", dest="from_file", metavar="FILE",
                   help="render every prompt in this file, one per line")


def add_model_args(parser: argparse.ArgumentParser, *, lora_schedules: bool = False) -> None:
    """--config --ckpt --vae --demo --device --precision --compile --cuda_graphs --lora (whose weight
    may be a schedule with ``lora_schedules``: audio2video)."""
    from sounddiffusion.model.flags import model_flags

    add_flag_group(parser, model_flags(lora_schedules=lora_schedules))


def settings_from_args(cls: type[Settings], args: argparse.Namespace) -> Settings:
    """The settings dataclass ``cls`` filled from the flags of the same names."""
    return cls(**{name: getattr(args, name) for name in cls.field_names() if hasattr(args, name)})


def model_settings(args: argparse.Namespace) -> ModelSettings:
    """The :class:`~sounddiffusion.settings.ModelSettings` of the flags of :func:`add_model_args`."""
    return settings_from_args(ModelSettings, args)


def add_sampling_args(parser: argparse.ArgumentParser, *, plms_flag: bool = True, scheduled: bool = False,
                      default_sampler: str = "ddim", prompt_file: bool = False) -> None:
    """Sampler, steps, guidance, negative prompt, seed and image geometry (txt2img's flags).
    ``scheduled``: --scale takes a schedule (audio2video, live.py); ``default_sampler``: the entry
    point's; ``prompt_file``: it has --prompt_file (audio2video), named in --negative_prompt's help."""
    from sounddiffusion.model.flags import sampling_flags

    add_flag_group(parser, sampling_flags(plms_flag=plms_flag, scheduled=scheduled, default_sampler=default_sampler,
                                          prompt_file=prompt_file))


def add_image_output_args(parser: argparse.ArgumentParser, default_outdir: str) -> None:
    """--outdir --n_iter --n_samples --n_rows --skip_grid --skip_save --fixed_code."""
    g = parser.add_argument_group("output")
    g.add_argument("--outdir", default=default_outdir, help="folder for the results")
    g.add_argument("--n_iter", type=int, default=1, help="sampling rounds")
    g.add_argument("--n_samples", type=int, default=1, help="images per round (batch size)")
    g.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    g.add_argument("--skip_grid", action="store_true", help="do not save a grid of all images")
    g.add_argument("--skip_save", action="store_true", help="do not save individual images")
    g.add_argument("--fixed_code", action="store_true",
                   help="use the same starting noise for every round")


def add_audio_conditioning_args(parser: argparse.ArgumentParser, *, scheduled: bool = False) -> None:
    """--feature --normalize --textprompt --textstrength (a schedule with ``scheduled``)."""
    from sounddiffusion.model.conditioning import NORMALIZE_MODES
    from sounddiffusion.sound.features import FEATURES

    g = parser.add_argument_group("audio conditioning")
    g.add_argument("--feature", default="fft", choices=FEATURES,
                   help="what of the sound becomes the (77, D) conditioning matrix")
    g.add_argument("--normalize", default=NORMALIZE_MODES[0], choices=NORMALIZE_MODES,
                   help="how raw features are brought into the range of text embeddings")
    g.add_argument("--textprompt", default="", help="text mixed with the sound")
    g.add_argument("--textstrength", type=str if scheduled else float, default="0.5" if scheduled else 0.5,
                   help="weight of the text prompt in the mix (see README: --normalize)"
                        + (SCHEDULE_HELP if scheduled else ""))


def add_music_reactive_args(parser: argparse.ArgumentParser, *, files: bool = True) -> None:
    """audio2video's per-frame control: schedules, seed jumps, bends, envelope smoothing and, with
    ``files`` (a sound known in advance), prompt snapping, reports and the sections' envelopes."""
    from sounddiffusion.control.bending import OPERATORS
    from sounddiffusion.sound.analysis import ENVELOPE_NAMES, GRID_NAMES, SNAP_UNITS

    g = parser.add_argument_group(
        "music-reactive control",
        "Per-frame numbers take a number or a schedule over the sound's envelopes "
        f"({', '.join((*ENVELOPE_NAMES, *GRID_NAMES))}, plus bpm, t, s, fps, max_f; "
        + ("section and section_start with --sections; " if files else "")
        + "NAME.onset, NAME.rms ... of each --control NAME=FILE): an expression such as "
        "\"0.35 + 0.4*onset\" or keyframes such as \"0:(0.4), 96:(0.7)\" (README: Music-reactive control)")
    g.add_argument("--seed_jump", default=None, metavar="EXPR",
                   help="frames where EXPR > 0.5 (e.g. \"beat\") take new img2img noise; between them the "
                        "noise holds still (default: new noise every frame)")
    g.add_argument("--bend", action="append", default=[], metavar="OP=AMOUNT[@WHERE]",
                   help=f"network bending, repeatable, applied in order; OP one of {', '.join(OPERATORS)}; "
                        "AMOUNT a number or schedule; WHERE latent (default), step=K, input_blocks.N, "
                        "middle_block or output_blocks.N (README: Network bending)")
    g.add_argument("--smoothing", default=None, metavar="SPEC",
                   help="change the envelopes' smoothing, e.g. \"onset:release=0.3,gate=0.5;centroid:median=9\"")
    if not files:
        return
    g.add_argument("--snap_prompts", default="none", choices=("none", *SNAP_UNITS),
                   help="move --prompt_file times to the nearest beat, downbeat or section start")
    g.add_argument("--plot", action="store_true",
                   help="also draw NAME.schedule.png: waveform, envelopes, beats, scheduled values")
    g.add_argument("--dry_run", action="store_true",
                   help="write NAME.schedule.csv (and the plot with --plot) and stop: no model, no video")


def add_coherence_args(parser: argparse.ArgumentParser, *, cadence: bool = True, init_img: bool = False) -> None:
    """audio2video's cures for colour drift, burn-in and (with ``cadence``) slow renders; ``init_img``:
    the entry point has --init-img, whose colours then are the reference."""
    from sounddiffusion.video.color import COLOR_SPACES

    g = parser.add_argument_group("coherence and cadence")
    g.add_argument("--color_coherence", default="none", choices=("none", *COLOR_SPACES),
                   help="match each frame's colour histogram to frame 0's"
                        + (" (or --init-img's)" if init_img else "") + " in this colour space before img2img")
    g.add_argument("--color_coherence_every", type=int, default=1, metavar="N",
                   help="match colours on every Nth frame only")
    g.add_argument("--color_coherence_strength", default="1", metavar="F",
                   help="blend of matched (1) and unmatched (0) colours" + SCHEDULE_HELP)
    if cadence:
        g.add_argument("--cadence", default="1", metavar="N",
                       help="diffuse every Nth frame and interpolate the frames between" + SCHEDULE_HELP)
        g.add_argument("--cadence_blend", default="latent", choices=("latent", "pixel"),
                       help="in-between frames: slerp of the latents, or a cross-fade of the pictures")
    g.add_argument("--latent_noise", default="0", metavar="F",
                   help="seeded fresh noise x F added to the chained latent before each img2img step "
                        "(against burn-in)" + SCHEDULE_HELP)
    g.add_argument("--contrast", default="1", metavar="F",
                   help="scale the chained latent's contrast by F before each img2img step "
                        "(1 = unchanged; slightly below 1 against burn-in)" + SCHEDULE_HELP)


def add_ray_args(parser: argparse.ArgumentParser, what: str) -> None:
    """--ray [ADDRESS] --ray_workers N: run a batch job on Ray; ``what`` names the items ("sound")."""
    g = parser.add_argument_group("cluster (Ray; pip install -r requirements-cluster.txt)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"make the {what}s on Ray workers, each loading the model once: without "
                        f"ADDRESS a local Ray instance on this machine, else a running cluster "
                        f"('auto', 'ray://HOST:PORT'; OUTDIR must be a path every node sees). "
                        f"OUTDIR/manifest.jsonl records every finished {what}: the same command "
                        f"again continues")
    g.add_argument("--ray_workers", type=int, default=None, metavar="N",
                   help="Ray workers (default: one per GPU of the cluster, else one)")


def fill_size_defaults(args: argparse.Namespace) -> None:
    """Unset --H/--W become 512 (256 with --demo)."""
    for name in ("H", "W"):
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, DEMO_SIZE if getattr(args, "demo", False) else DEFAULT_SIZE)


def validate_args(args: argparse.Namespace) -> None:
    """Check the numbers an entry point received; raise ParameterError naming the bad value."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ParameterError(message)

    if getattr(args, "demo", False):
        flags = [f"--{name}" for name in ("ckpt", "config") if getattr(args, name, None)]
        given = " and ".join(f"{flag} {getattr(args, flag[2:])}" for flag in flags)
        need(not flags, f"--demo uses the built-in demo model and cannot load {given}: leave out --demo "
                        f"to use {'them' if len(flags) > 1 else 'it'}, or leave out {' and '.join(flags)}")

    for name in ("H", "W"):
        value = getattr(args, name, None)
        if value is not None:
            need(value >= 64 and value % 64 == 0,
                 f"--{name} {value} is not allowed: use a multiple of 64 such as 256, 320, 384, 448, "
                 f"512, 576, 640, 704 or 768")
    if getattr(args, "f", 8) != 8 or getattr(args, "C", 4) != 4:
        need(False, f"--f {args.f} --C {args.C}: Stable Diffusion v1 models need --f 8 --C 4")
    if hasattr(args, "ddim_steps"):
        need(args.ddim_steps >= 1, f"--ddim_steps {args.ddim_steps}: use at least 1 step")
        need(args.ddim_steps <= 1000, f"--ddim_steps {args.ddim_steps}: use at most 1000 steps")
    # Schedules (audio2video's per-frame numbers, text) are checked when the frames are planned.
    if isinstance(getattr(args, "scale", None), (int, float)):
        need(args.scale >= 0, f"--scale {args.scale}: the guidance scale cannot be negative")
    if hasattr(args, "ddim_eta"):
        need(0 <= args.ddim_eta < float("inf"), f"--ddim_eta {args.ddim_eta}: use a number of 0 or more")
    if hasattr(args, "sampler"):
        _check_sampler_args(args)
    if getattr(args, "ray_workers", None) is not None:
        need(args.ray is not None, f"--ray_workers {args.ray_workers}: give --ray too")
        need(args.ray_workers >= 1, f"--ray_workers {args.ray_workers}: use at least 1")
    for name in ("n_samples", "n_iter", "batch_size", "color_coherence_every"):
        value = getattr(args, name, None)
        if value is not None:
            need(value >= 1, f"--{name} {value}: use at least 1")
    if getattr(args, "n_rows", 0) < 0:
        need(False, f"--n_rows {args.n_rows}: use 0 (automatic) or more")
    # audio2video's --strength is a schedule, checked when its frames are planned.
    if isinstance(getattr(args, "strength", None), (int, float)):
        start = "the init image"
        need(0.0 <= args.strength <= 1.0,
             f"--strength {args.strength} is outside [0, 1]: 0 keeps {start}, 1 ignores it completely")
    if hasattr(args, "crf"):
        low, high = CRF_RANGE
        need(low <= args.crf <= high, f"--crf {args.crf}: use {low} (best, largest file) to {high} "
                                      f"(worst, smallest); 18 looks like the frames at a modest size")
    if hasattr(args, "fps"):
        need(0 < args.fps <= MAX_FPS, f"--fps {args.fps}: use a frame rate above 0 and at most {MAX_FPS}")
    if hasattr(args, "preview_every"):
        need(0 <= args.preview_every < float("inf"),
             f"--preview_every {args.preview_every}: give seconds of video between previews, or 0 for none")
    if getattr(args, "output", None) is not None:
        need(os.path.splitext(args.output)[1].lower() == ".mp4",
             f"--output {args.output}: the video is written as MP4 (H.264 and AAC); give a name ending in .mp4")
    if isinstance(getattr(args, "textstrength", None), (int, float)):
        if args.normalize == "text-range":
            need(args.textstrength > 0, f"--textstrength {args.textstrength}: --normalize text-range "
                                        f"divides by it; use a value > 0")
        else:
            need(0 <= args.textstrength <= 1, f"--textstrength {args.textstrength}: use a value in "
                                              f"[0, 1] (0 = sound only, 1 = text only)")


def _check_sampler_args(args: argparse.Namespace) -> None:
    """--sampler against --plms / --ddim, eta, steps and a constant --strength (audio2video's
    scheduled one is checked frame by frame when its frames are planned)."""
    from sounddiffusion.model.samplers import check_sampling, check_strength

    switch = "plms" if getattr(args, "plms", False) else "ddim" if getattr(args, "ddim", False) else None
    sampler = pick_sampler(args.sampler, default="plms" if hasattr(args, "ddim") else "ddim", switch=switch)
    to_ddim = ("leave out --plms" if switch == "plms" else "use --sampler ddim" if args.sampler
               else "add --ddim")
    check_sampling(sampler, args.ddim_steps, args.ddim_eta, to_ddim)
    if isinstance(getattr(args, "strength", None), (int, float)):
        check_strength(sampler, args.ddim_steps, args.strength)


def check_before_loading(args: argparse.Namespace) -> None:
    """The model's flags against this machine, before anything loads: device, precision,
    --cuda_graphs, the checkpoint and --config files, and whether --H x --W fits in memory with
    the pictures sampled together (not with --ray: its workers may run elsewhere). Not for
    --dry_run and live.py's --list_devices, which load no model."""
    if not hasattr(args, "ckpt") or getattr(args, "dry_run", False) or getattr(args, "list_devices", False):
        return
    from sounddiffusion.model.loading import check_model_settings

    batched = getattr(args, "input_folder", None) or getattr(args, "from_file", None)
    pictures = getattr(args, "n_samples", 1) * (getattr(args, "batch_size", 1) if batched else 1)
    size = {} if getattr(args, "ray", None) is not None else {"height": args.H, "width": args.W}
    check_model_settings(model_settings(args), pictures=pictures, **size)


def _user_message(exc: BaseException, args: argparse.Namespace) -> str | None:
    """The one-line message for an exception caused by the user's input or machine, else None.

    ``args``: the run's arguments, so that advice names only flags this command has."""
    from ldm.util import CheckpointError

    if isinstance(exc, (UserError, CheckpointError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        again = "run again with --resume" if hasattr(args, "resume") else "run again"
        return str(OutputError(f"the disk is full ({exc.filename or 'while writing'}): free some space "
                               f"and {again}"))
    oom = getattr(__import__("torch"), "OutOfMemoryError", ())
    if isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc)):
        smaller = ", ".join(["--H/--W", *(f"--{name}" for name in ("n_samples", "batch_size") if hasattr(args, name))])
        return str(DeviceError(f"out of GPU memory: use a smaller {smaller}, or --precision fp16"))
    return None


def run(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run ``main(args)`` and turn user mistakes into exit status 2.

    Returns the process exit status: what ``main`` returns (None counts as 0; a batch that skipped
    inputs returns :data:`EXIT_SKIPPED`), 0 after --help, 2 for a user mistake (one line on
    stderr), 130 on Ctrl-C. With ``--debug`` the traceback of any error is shown.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or an argparse error already printed as one line
        return exc.code if isinstance(exc.code, int) else 0
    configure_logging(args.debug)
    fill_size_defaults(args)
    try:
        validate_args(args)
        check_before_loading(args)
        status = main(args)
    except KeyboardInterrupt as exc:
        # A job may say what was kept and how to go on (audio2video: --resume).
        detail = " ".join(str(exc).split()) or "finished outputs are kept"
        print(f"{parser.prog}: interrupted; {detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the boundary where errors become exit codes
        message = _user_message(exc, args)
        if message is None or args.debug:
            raise
        first_line = " ".join(message.split())
        print(f"{parser.prog}: error: {first_line}", file=sys.stderr)
        return EXIT_USER_ERROR
    return status if isinstance(status, int) else 0


def main_entry(build_parser: Callable[[], argparse.ArgumentParser],
               main: Callable[[argparse.Namespace], object]) -> None:
    """What every script's ``if __name__ == "__main__"`` calls."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # SIGTERM (a closed terminal, a job scheduler) stops a render like Ctrl-C: outputs stay usable.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    sys.exit(run(main, build_parser()))


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
