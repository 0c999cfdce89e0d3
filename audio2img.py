#!/usr/bin/env python
"""Sound to image: one picture per sound, from its waveform, spectrum, mel spectrogram or MFCCs.

    python audio2img.py --prompt examples/audio/bell.wav --feature fft --demo
    python audio2img.py --input_folder my_sounds/ --textprompt "a forest at dawn" --textstrength 0.3
    python audio2img.py --input_folder library/ --ray --ray_workers 2    # on Ray, resumable
"""

from sounddiffusion import cli


def build_parser():
    parser = cli.make_parser(
        "audio2img.py", __doc__,
        epilog="Images go to OUTDIR/<sound name>/FEATURE-NNNNN.png, numbered after existing ones; "
               "each PNG carries its generation parameters in a 'parameters' text chunk. Every file "
               "written is listed. Sounds of a folder or list that cannot be read are skipped and "
               f"named; the run then ends with exit status {cli.EXIT_SKIPPED} (2: a mistake, nothing "
               "rendered).")
    sounds = parser.add_argument_group("sounds (give one of these)")
    source = sounds.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", "--audio", dest="audio", metavar="AUDIO_PATH",
                        help="one sound file (wav, flac, ogg, mp3, ...)")
    source.add_argument("--input_folder", metavar="DIR", help="every sound file in this folder")
    source.add_argument("--from-file", dest="from_file", metavar="LIST",
                        help="a text file with one sound path per line ('#' at a line's start: a comment)")
    cli.add_audio_conditioning_args(parser)
    parser.add_argument("--batch_size", type=int, default=4,
                        help="sounds sampled together in one call (more is faster on a GPU)")
    cli.add_sampling_args(parser)
    cli.add_image_output_args(parser, default_outdir="outputs/audio2img-samples")
    cli.add_model_args(parser)
    cli.add_ray_args(parser, "sound")
    return parser


def main(args):
    from sounddiffusion.settings import SoundImageSettings

    settings = cli.settings_from_args(SoundImageSettings, args)
    if settings.ray is not None:
        from sounddiffusion.jobs.batch_jobs import run_audio2img_batch

        summary = run_audio2img_batch(settings, cli.model_settings(args))
        return cli.EXIT_SKIPPED if summary.problems else 0
    from sounddiffusion.jobs.image_jobs import run_audio2img

    written = run_audio2img(settings, cli.model_settings(args))
    return cli.EXIT_SKIPPED if written.skipped else 0


if __name__ == "__main__":
    cli.main_entry(build_parser, main)
