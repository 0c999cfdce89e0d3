#!/usr/bin/env python
"""How the --demo model listens, measured: a picture sheet and a table of differences.

    python scripts/demo_figure.py                       # docs/demo-listens.png, table on stdout
    python scripts/demo_figure.py --video               # + frame change vs onsets, docs/demo-onsets.png

Renders audio2img pictures (128x128, 10 DDIM steps, guidance 7.5, fft features unless said) of
the four recordings in ../shared/audio with seeds 1 and 2, then one recording with a prompt mixed
in and with each other feature. Prints, as mean absolute differences of 0..255 pixel values:
two seeds of one recording, two recordings, text mixed in, another feature; img2img of a
photograph at three strengths; the autoencoder's reconstruction error on scikit-image's
bundled photographs at 256x256; and what three bends inside UNet blocks change in a picture. With --video it renders videos of each recording and of the
project's synthesized drums and chords (whole sounds, 8 fps, 128x128, 10 steps) with a constant
--strength 0.5 and with the onset recipe --strength "0.2+0.6*onset", and correlates the
frame-to-frame change with the onset envelope (as scripts/video_stats.py does).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sounddiffusion.jobs.image_jobs import sample_images, sound_conditioning  # noqa: E402
from sounddiffusion.model.loading import load_engine  # noqa: E402
from sounddiffusion.settings import ModelSettings, SoundImageSettings, VideoSettings  # noqa: E402
from sounddiffusion.sound.audio import load_audio  # noqa: E402
from sounddiffusion.video.loop import run_audio2video  # noqa: E402
from sounddiffusion.video.video_stats import VideoStats, video_stats  # noqa: E402

AUDIO = REPO.parent / "shared" / "audio"
RECORDINGS = ("Beethoven_chord1.wav", "JK_Organ2_120-F.wav", "Toms_diner.wav", "synth_chords_short.wav")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
EXAMPLES = REPO / "examples" / "audio"
VIDEO_SOUNDS = tuple(AUDIO / name for name in RECORDINGS) + (EXAMPLES / "drums.wav", EXAMPLES / "chords.wav")
STRENGTHS = ("0.5", "0.2+0.6*onset")  # constant, and the onset recipe
BLOCK_BENDS = ("dilate=3@output_blocks.5", "erode=1@output_blocks.7", "rotate_z=1.5@output_blocks.6")


def picture(engine, samples, seed: int, **settings) -> np.ndarray:
    settings = SoundImageSettings(H=128, W=128, ddim_steps=10, **settings)
    cond = sound_conditioning(engine, samples, settings)
    return sample_images(engine, cond[None], [seed], settings)[0]


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


def photograph(name: str, size: int) -> np.ndarray:
    """scikit-image's bundled photograph ``name`` resized to ``(size, size, 3)`` uint8."""
    import skimage.data
    from skimage.transform import resize

    return (resize(getattr(skimage.data, name)(), (size, size), anti_aliasing=True) * 255).round().astype(np.uint8)


def reconstruction_errors(engine) -> dict[str, float]:
    errors = {}
    for name in PHOTOS:
        photo = photograph(name, 256)
        restored = engine.decode(engine.encode_image(photo[None]))[0]
        errors[name] = mad(restored, photo)
    return errors


def img2img_distances(engine, samples, strengths=(0.2, 0.5, 0.8)) -> dict[float, tuple[float, float]]:
    """img2img of scikit-image's astronaut (128x128, 10 DDIM steps, seed 5) under the sound
    ``samples``: for each strength, the result's difference from the photograph and from the
    sound's own txt2img picture (same noise). Low strength keeps the photograph, high strength
    gives the sound's picture, as with real weights."""
    photo = photograph("astronaut", 128)
    cond = sound_conditioning(engine, samples, SoundImageSettings())[None]
    latent = engine.encode_image(photo[None])
    noise = engine.noise(tuple(latent.shape), 5)
    own = engine.decode(engine.txt2img(cond, x_T=noise, sampler="ddim", steps=10))[0]
    distances = {}
    for strength in strengths:
        result = engine.decode(engine.img2img(latent, cond, noise=noise, strength=strength, sampler="ddim",
                                              steps=10))[0]
        distances[strength] = (mad(result, photo), mad(result, own))
    return distances


def block_bend_differences(engine, samples, bends=BLOCK_BENDS) -> dict[str, float]:
    """For each ``--bend`` text of a UNet block with a constant amount: the mean absolute difference
    (0..255) of the picture of ``samples`` (seed 1) bent that way from the un-bent picture."""
    from sounddiffusion.control.bending_specs import BlockBender, parse_bend

    plain, unet, differences = picture(engine, samples, 1), engine.model.model.diffusion_model, {}
    for text in bends:
        spec = parse_bend(text)
        with BlockBender(unet, [spec]) as bender:
            bender.set_amounts([float(spec.amount)])
            differences[text] = mad(picture(engine, samples, 1), plain)
    return differences


def demo_video(engine, sound: Path, strength: str, workdir: Path, *, save_frames: bool = False) -> VideoStats:
    """The measures of a demo video of ``sound`` (8 fps, 128x128, 10 steps, seed 3) rendered into
    ``workdir``; with ``save_frames`` its frames are also PNGs in ``workdir/<stem>-frames``."""
    settings = VideoSettings(audio=str(sound), fps=8, H=128, W=128, ddim_steps=10, strength=strength, seed=3,
                             outdir=str(workdir), save_frames=save_frames)
    return video_stats(run_audio2video(settings, ModelSettings(demo=True, device="cpu"), engine=engine))


def video_correlation(engine, sound: Path, strength: str, workdir: Path) -> float | None:
    """Correlation of the frame-to-frame change of :func:`demo_video` with the sound's onset envelope."""
    return demo_video(engine, sound, strength, workdir).onset_correlation


def onset_figure(engine, sound: Path, out: Path, workdir: Path, n_strip: int = 16) -> dict[str, VideoStats]:
    """A PNG at ``out``: the first ``n_strip`` frames of the onset recipe's video of ``sound``,
    and under them the frame-to-frame change of that video and of the constant-strength one
    against the sound's onset envelope. Returns the two videos' measures by ``--strength``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    runs = {strength: demo_video(engine, sound, strength, workdir / f"strength-{i}", save_frames=i == 1)
            for i, strength in enumerate(STRENGTHS)}
    frames = sorted((workdir / "strength-1").glob(f"{sound.stem}-frames/*.png"))[:n_strip]
    strip = np.concatenate([np.asarray(Image.open(path).convert("RGB")) for path in frames], axis=1)
    figure = Figure(figsize=(12, 5.2), dpi=100, layout="constrained")
    strip_ax, change_ax = figure.subplots(2, 1, height_ratios=(1, 2.2))
    strip_ax.imshow(strip)
    strip_ax.set_axis_off()
    strip_ax.set_title(f"{sound.name}, --demo --fps 8 --strength \"{STRENGTHS[1]}\": frames 0-{len(frames) - 1}")
    stats = runs[STRENGTHS[1]]
    seconds = np.arange(stats.frames) / stats.fps
    for strength, run in runs.items():
        change_ax.plot(seconds[1:], run.flicker[1:], marker=".",
                       label=f"--strength {strength} (r = {run.onset_correlation:+.2f})")
    change_ax.set_ylabel("frame change: mean |luma change| (0..255)")
    change_ax.set_xlabel("time (s)")
    change_ax.legend(loc="upper left", fontsize="small")
    onset_ax = change_ax.twinx()
    onset_ax.plot(seconds, stats.onset, color="tab:red", alpha=0.6, linewidth=1, label="onset envelope")
    onset_ax.set_ylabel("onset strength (0..1)")
    onset_ax.legend(loc="upper right", fontsize="small")
    figure.savefig(out, format="png")
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "demo-listens.png"))
    parser.add_argument("--video", action="store_true", help="also measure frame change vs onsets")
    parser.add_argument("--video-out", default=str(REPO / "docs" / "demo-onsets.png"),
                        help="with --video: the figure of the drums' frames and frame change")
    args = parser.parse_args(argv)
    engine = load_engine(ModelSettings(demo=True, device="cpu"))
    sounds = {name: load_audio(AUDIO / name) for name in RECORDINGS}
    pictures = {(name, seed): picture(engine, y, seed) for name, y in sounds.items() for seed in (1, 2)}
    voice = sounds["Toms_diner.wav"]
    extra = {"text 0.5": picture(engine, voice, 1, textprompt="a red apple", textstrength=0.5),
             **{feature: picture(engine, voice, 1, feature=feature) for feature in ("melspectrogram", "mfcc")}}
    rows = [np.concatenate([pictures[name, 1] for name in RECORDINGS], axis=1),
            np.concatenate([pictures[name, 2] for name in RECORDINGS], axis=1),
            np.concatenate([pictures["Toms_diner.wav", 1], *extra.values()], axis=1)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)
    seeds = [mad(pictures[name, 1], pictures[name, 2]) for name in RECORDINGS]
    recordings = [mad(pictures[a, 1], pictures[b, 1]) for a, b in itertools.combinations(RECORDINGS, 2)]
    print(f"sheet: {args.out} (rows: seed 1 of {', '.join(RECORDINGS)}; seed 2; Toms_diner with fft, "
          f"{', '.join(extra)})")
    print(f"two seeds, one recording:  {min(seeds):.1f} .. {max(seeds):.1f}")
    print(f"two recordings, one seed:  {min(recordings):.1f} .. {max(recordings):.1f}")
    for name, image in extra.items():
        print(f"Toms_diner, {name} vs fft alone: {mad(image, pictures['Toms_diner.wav', 1]):.1f}")
    print("img2img of a photograph under Toms_diner, difference from the photograph / from the sound's picture: "
          + ", ".join(f"strength {strength} {photo:.1f} / {own:.1f}"
                      for strength, (photo, own) in img2img_distances(engine, voice).items()))
    errors = reconstruction_errors(engine)
    print("autoencoder, mean |decode(encode(x)) - x| at 256x256: "
          + ", ".join(f"{name} {error:.1f}" for name, error in errors.items())
          + f" (mean {np.mean(list(errors.values())):.1f})")
    print("Toms_diner, a bend inside a UNet block vs none: "
          + ", ".join(f"{text} {difference:.1f}" for text, difference in block_bend_differences(engine, voice).items()))
    if args.video:
        with tempfile.TemporaryDirectory() as workdir:
            for sound in VIDEO_SOUNDS:
                r = [video_correlation(engine, sound, strength, Path(workdir)) for strength in STRENGTHS]
                print(f"frame change vs onset, {sound.name} (8 fps): "
                      + ", ".join(f"--strength {s} r={x:+.2f}" for s, x in zip(STRENGTHS, r)))
            onset_figure(engine, EXAMPLES / "drums.wav", Path(args.video_out), Path(workdir) / "figure")
            print(f"figure: {args.video_out} (the drums' frames, frame change against onsets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
