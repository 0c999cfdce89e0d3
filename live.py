#!/usr/bin/env python
"""Live: pictures that answer a sound as it plays, on a local web page (full screen for a show).

The frame chain of audio2video.py (img2img from the previous picture, its schedules and bends)
runs on the newest sound from a microphone or line input, or from a file played in real time;
open the address it prints in a browser.

    python live.py --demo                                   # the default microphone
    python live.py --demo --input examples/audio/drums.wav --loop --H 128 --W 128
    python live.py --ckpt model.safetensors --strength "0.3 + 0.4*onset" --record set.mp4
    python live.py --demo --input mix.wav --control drums=drums.wav --strength "0.3 + 0.5*drums.onset" --bpm 120
"""

import math
from dataclasses import replace

from sounddiffusion import cli
from sounddiffusion.control.frame_schedules import CHAIN_FLAGS
from sounddiffusion.flags import FlagGroup
from sounddiffusion.settings import LIVE_HOST, LIVE_PORT
from sounddiffusion.sound.music_flags import MUSIC_FLAGS
from sounddiffusion.video.camera import MOTION_FLAGS

LIVE_MUSIC_HELP = {
    "--control": "a control track, repeatable: a sound file (a stem: drums, bass, vocals) played in step with the "
                 "input, whose envelopes schedules read as NAME.onset, NAME.rms, NAME.low ...; at the input's time "
                 "(again from its start on each pass of --loop), silent after its end; none by default",
    "--bpm": "set an exact beat grid at this tempo instead of tracking the beats as they come (the page shows "
             "the tracked tempo)",
}
LIVE_MUSIC_FLAGS = FlagGroup(
    MUSIC_FLAGS.title,
    tuple(replace(flag, help=LIVE_MUSIC_HELP.get(flag.names[0], flag.help)) for flag in MUSIC_FLAGS.flags
          if flag.names[0] != "--sections"),  # sections need the whole song
    "Stems as control tracks and a beat grid you set (README: live.py)")
"""audio2video's music flags that a live sound can take: all but --sections."""


def build_parser():
    parser = cli.make_parser(
        "live.py", __doc__,
        epilog="Ctrl-C stops (and finishes --record). The page listens on 127.0.0.1 only unless --host "
               "says otherwise; then every request needs the token in the printed address.")
    sound = parser.add_argument_group("sound in")
    sound.add_argument("--input", default="mic", metavar="mic|FILE",
                       help="'mic': the default input device (or --device_index); else a sound file played "
                            "in real time")
    sound.add_argument("--loop", action="store_true", help="play --input FILE again and again")
    sound.add_argument("--list_devices", action="store_true", help="list the input devices and stop")
    sound.add_argument("--device_index", type=int, default=None, metavar="N",
                       help="record from input device N of --list_devices (--device is cpu/cuda)")
    sound.add_argument("--fps", type=float, default=24,
                       help="frames per second the sound is cut into: envelopes, schedules (t, keyframes) and "
                            "--record count in them, and no more pictures than this are made")
    sound.add_argument("--rest", type=float, default=0.02, metavar="F",
                       help="rest while no envelope has moved by more than F since the last picture "
                            "(silence, a held note); 0 never rests")
    cli.add_flag_group(parser, CHAIN_FLAGS)
    cli.add_audio_conditioning_args(parser, scheduled=True)
    cli.add_music_reactive_args(parser, files=False)
    cli.add_flag_group(parser, LIVE_MUSIC_FLAGS)
    cli.add_coherence_args(parser, cadence=False)
    cli.add_flag_group(parser, MOTION_FLAGS)
    cli.add_sampling_args(parser, plms_flag=False, scheduled=True, default_sampler="ddim")
    parser.set_defaults(ddim_steps=4)
    page = parser.add_argument_group("page and recording")
    page.add_argument("--host", default=LIVE_HOST,
                      help="address to serve on; 0.0.0.0 reaches the network (then a token is required)")
    page.add_argument("--port", type=int, default=LIVE_PORT, help="port to serve on (0: any free one)")
    page.add_argument("--record", default=None, metavar="OUT.mp4",
                      help="record what was shown, with the sound, into this MP4")
    page.add_argument("--seconds", type=float, default=None, metavar="N",
                      help="stop after N seconds of sound (default: at Ctrl-C, or the end of --input FILE)")
    cli.add_model_args(parser, lora_schedules=True)
    return parser


def main(args):
    from sounddiffusion.errors import ParameterError
    from sounddiffusion.settings import LiveSettings

    if args.list_devices:
        from sounddiffusion.live.input import list_devices

        print(list_devices())
        return 0
    if args.seconds is not None and not (args.seconds > 0 and math.isfinite(args.seconds)):
        raise ParameterError(f"--seconds {args.seconds}: give a number of seconds above 0 (leave it out to run "
                             f"until Ctrl-C)")
    if not 0 <= args.port <= 65535:
        raise ParameterError(f"--port {args.port}: use 1 to 65535, or 0 for any free port")
    if not args.rest >= 0:
        raise ParameterError(f"--rest {args.rest}: use 0 (never rest) or more")
    from sounddiffusion.live.loop import run_live

    run_live(cli.settings_from_args(LiveSettings, args), cli.model_settings(args),
             announce=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    cli.main_entry(build_parser, main)
