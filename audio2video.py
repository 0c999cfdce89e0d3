#!/usr/bin/env python
"""Music-reactive video: the picture evolves with the sound, which is muxed back in.

Frame 0 comes from txt2img (or --init-img), every next frame from img2img on the previous one,
each conditioned on its own slice of the sound (PLMS by default; --sampler lcm or euler_a with a
few-step model renders several times faster, README: Fast sampling).

    python audio2video.py --demo --path examples/audio/chords.wav --fps 8
    python audio2video.py --path song.mp3 --fps 12 --strength 0.5 --textprompt "a neon city at night"
    python audio2video.py --input_folder album/ --ray       # one video per song, on Ray workers
"""

from sounddiffusion import cli
from sounddiffusion.control.frame_schedules import CHAIN_FLAGS
from sounddiffusion.settings import DEFAULT_CRF
from sounddiffusion.sound.music_flags import MUSIC_FLAGS
from sounddiffusion.video.camera import MOTION_FLAGS


def build_parser():
    parser = cli.make_parser(
        "audio2video.py", __doc__,
        epilog="The video goes to OUTDIR/<sound name>.mp4 (numbered if it exists) and appears "
               "only when complete; an interrupted render continues with --resume.")
    songs = parser.add_argument_group("sound (give one of these)")
    source = songs.add_mutually_exclusive_group(required=True)
    source.add_argument("--path", "--audio", dest="audio", metavar="AUDIO",
                        help="the sound file (wav, flac, ogg, mp3, ...)")
    source.add_argument("--input_folder", metavar="DIR",
                        help="every sound file in this folder, one video each (OUTDIR/<song name>.mp4, "
                             "each as --path SONG gives it); OUTDIR/manifest.jsonl records the "
                             "finished ones, so the same command again continues")
    parser.add_argument("--fps", type=float, default=12, help="video frames per second (fractions allowed)")
    cli.add_flag_group(parser, CHAIN_FLAGS)
    cli.add_audio_conditioning_args(parser, scheduled=True)
    parser.add_argument("--textpromptend", default=None,
                        help="text the prompt moves to by the end of the video (linear interpolation)")
    parser.add_argument("--prompt_file", default=None, metavar="FILE",
                        help="timestamped prompts, one per line ('0:20 text', '12.5 text'), interpolated")
    parser.add_argument("--init-img", dest="init_img", default=None, metavar="IMG",
                        help="start from this image instead of txt2img (resized and center-cropped)")
    parser.add_argument("--ddim", action="store_true", help="use DDIM instead of PLMS (= --sampler ddim)")
    cli.add_music_reactive_args(parser)
    cli.add_flag_group(parser, MUSIC_FLAGS)
    cli.add_coherence_args(parser, init_img=True)
    cli.add_flag_group(parser, MOTION_FLAGS)
    cli.add_sampling_args(parser, plms_flag=False, scheduled=True, default_sampler="plms", prompt_file=True)
    parser.set_defaults(ddim_steps=25)
    out = parser.add_argument_group("output")
    out.add_argument("--outdir", default="outputs/audio2video", help="folder for the video")
    out.add_argument("--output", default=None, metavar="FILE.mp4",
                     help="the video's file name (default: OUTDIR/<sound name>.mp4)")
    out.add_argument("--crf", type=int, default=DEFAULT_CRF, metavar="N",
                     help="H.264 quality of the MP4, 0-51: lower keeps more detail in a larger file "
                          "(see README)")
    out.add_argument("--save_frames", action="store_true",
                     help="also save every frame as PNG, with its settings, frame number and time, in "
                          "a folder beside the video (NAME-frames/)")
    out.add_argument("--preview_every", type=float, default=0, metavar="SECONDS",
                     help="write a playable in-progress video, NAME.preview.mp4, every SECONDS of video "
                          "(0 = never; with --vae taesd:PATH its frames, as all, are TAESD's cheap decodes); it "
                          "is removed when the render finishes")
    out.add_argument("--resume", action="store_true",
                     help="continue an interrupted render of the same output from its last frame")
    out.add_argument("--pixel_roundtrip", action="store_true",
                     help="decode and re-encode every frame between steps, as upstream did "
                          "(slower; slightly different pictures)")
    cli.add_model_args(parser, lora_schedules=True)
    cli.add_ray_args(parser, "song")
    return parser


def main(args):
    from sounddiffusion.settings import VideoSettings

    settings = cli.settings_from_args(VideoSettings, args)
    if settings.input_folder or settings.ray is not None:
        from sounddiffusion.jobs.batch_jobs import run_audio2video_batch

        summary = run_audio2video_batch(settings, cli.model_settings(args))
        return cli.EXIT_SKIPPED if summary.problems else 0
    from sounddiffusion.video.loop import run_audio2video

    run_audio2video(settings, cli.model_settings(args))
    return 0


if __name__ == "__main__":
    cli.main_entry(build_parser, main)
