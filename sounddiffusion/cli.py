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
from sounddiffusion.settings import (CHECKPOINT_DIR, CRF_RANGE, DEFAULT_CONFIG, DEFAULT_SIZE, DEMO_SIZE,
                                     DEVICES, JobSettings, MAX_FPS, ModelSettings, PRECISIONS,
                                     V2_CHECKPOINT_DIR, V2_CONFIG, V2_V_CONFIG, shown_path)

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


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--config --ckpt --demo --device --precision --compile --cuda_graphs."""
    g = parser.add_argument_group("model")
    g.add_argument("--config", default=None,
                   help=f"model config (CompVis YAML format); default: picked from the checkpoint's "
                        f"keys: {shown_path(DEFAULT_CONFIG)} for SD v1, {shown_path(V2_CONFIG)} for "
                        f"SD 2.x ({V2_V_CONFIG.name} when the file name contains 768)")
    g.add_argument("--ckpt", default=None,
                   help=f"checkpoint (.ckpt or .safetensors); default: model.ckpt or "
                        f"model.safetensors in {shown_path(CHECKPOINT_DIR)}/, else the one file in "
                        f"{shown_path(V2_CHECKPOINT_DIR)}/")
    g.add_argument("--demo", action="store_true",
                   help="use the small built-in demo model (hand-designed, abstract pictures that follow "
                        "the sound; README: The demo model) to try the tools without downloading a checkpoint")
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to run: auto picks CUDA, then Apple MPS, then CPU")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: fp16 on CUDA, float32 elsewhere; full: float32; autocast: "
                        "mixed precision as upstream; fp16/bf16: half-precision weights")
    g.add_argument("--compile", action="store_true",
                   help="compile the UNet with torch.compile: faster steps once the first one has "
                        "compiled it (minutes; on a CPU it needs a C++ compiler); pays off for videos")
    g.add_argument("--cuda_graphs", action="store_true",
                   help="CUDA only: replay each UNet call from a captured CUDA graph (one per picture "
                        "size) instead of launching its kernels one by one; experimental, off by default")


def settings_from_args(cls: type[Settings], args: argparse.Namespace) -> Settings:
    """The settings dataclass ``cls`` filled from the flags of the same names."""
    return cls(**{name: getattr(args, name) for name in cls.field_names() if hasattr(args, name)})


def model_settings(args: argparse.Namespace) -> ModelSettings:
    """The :class:`~sounddiffusion.settings.ModelSettings` of the flags of :func:`add_model_args`."""
    return settings_from_args(ModelSettings, args)


def add_sampling_args(parser: argparse.ArgumentParser, *, plms_flag: bool = True, scheduled: bool = False) -> None:
    """Sampler, steps, guidance, seed and image geometry (txt2img's flags). ``scheduled``: --scale
    takes a schedule (audio2video)."""
    g = parser.add_argument_group("sampling")
    if plms_flag:
        g.add_argument("--plms", action="store_true", help="use the PLMS sampler (default: DDIM)")
    g.add_argument("--ddim_steps", type=int, default=50, help="number of denoising steps")
    g.add_argument("--ddim_eta", type=float, default=0.0,
                   help="DDIM eta (0 = deterministic DDIM; PLMS needs 0)")
    g.add_argument("--scale", type=str if scheduled else float, default="7.5" if scheduled else 7.5,
                   help="classifier-free guidance scale: how strongly the conditioning steers"
                        + (SCHEDULE_HELP if scheduled else ""))
    g.add_argument("--seed", type=int, default=42, help="random seed: same seed, same result")
    g.add_argument("--H", type=int, default=None,
                   help=f"image height in pixels (default {DEFAULT_SIZE}, {DEMO_SIZE} with --demo)")
    g.add_argument("--W", type=int, default=None,
                   help=f"image width in pixels (default {DEFAULT_SIZE}, {DEMO_SIZE} with --demo)")
    g.add_argument("--C", type=int, default=4, help="latent channels")
    g.add_argument("--f", type=int, default=8, help="downsampling factor of the autoencoder")


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
    ``files`` (a sound known in advance), prompt snapping and reports."""
    from sounddiffusion.control.bending import OPERATORS
    from sounddiffusion.sound.analysis import ENVELOPE_NAMES

    g = parser.add_argument_group(
        "music-reactive control",
        "Per-frame numbers take a number or a schedule over the sound's envelopes "
        f"({', '.join(ENVELOPE_NAMES)}, plus bpm, t, s, fps, max_f): an expression such as "
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
    g.add_argument("--snap_prompts", default="none", choices=("none", "beat"),
                   help="move --prompt_file times to the nearest beat")
    g.add_argument("--plot", action="store_true",
                   help="also draw NAME.schedule.png: waveform, envelopes, beats, scheduled values")
    g.add_argument("--dry_run", action="store_true",
                   help="write NAME.schedule.csv (and the plot with --plot) and stop: no model, no video")


def add_coherence_args(parser: argparse.ArgumentParser, *, cadence: bool = True) -> None:
    """audio2video's cures for colour drift, burn-in and (with ``cadence``) slow renders."""
    from sounddiffusion.video.color import COLOR_SPACES

    g = parser.add_argument_group("coherence and cadence")
    g.add_argument("--color_coherence", default="none", choices=("none", *COLOR_SPACES),
                   help="match each frame's colour histogram to frame 0's (or --init-img's) in this "
                        "colour space before img2img")
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
        need(args.ddim_eta >= 0, f"--ddim_eta {args.ddim_eta}: eta cannot be negative")
        uses_plms = getattr(args, "plms", False) or (hasattr(args, "ddim") and not args.ddim)
        if uses_plms:
            ddim = "add --ddim" if hasattr(args, "ddim") else "leave out --plms"
            need(args.ddim_eta == 0, f"--ddim_eta {args.ddim_eta}: PLMS is deterministic and "
                                     f"needs eta 0; {ddim} to sample with DDIM for eta > 0")
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
    if isinstance(getattr(args, "textstrength", None), (int, float)):
        if args.normalize == "text-range":
            need(args.textstrength > 0, f"--textstrength {args.textstrength}: --normalize text-range "
                                        f"divides by it; use a value > 0")
        else:
            need(0 <= args.textstrength <= 1, f"--textstrength {args.textstrength}: use a value in "
                                              f"[0, 1] (0 = sound only, 1 = text only)")


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
