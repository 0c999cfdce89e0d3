"""--bend in real renders on the demo model: --rms_bend is an add of loudness x F, identity amounts
leave every frame alone, bends change frames where they act, bad specs are one line before the
model loads. (The operators themselves: tests/test_bending.py; resuming a bent render:
tests/test_music_reactive.py.)"""

import numpy as np
import pytest

from PIL import Image

from cli_checks import DEMO, assert_one_line_error, click_track
from sounddiffusion.video import loop

FAST = [*DEMO, "--fps", "8", "--seed", "5", "--strength", "0.6"]


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    return click_track(tmp_path_factory.mktemp("clicks") / "clicks.wav", seconds=1.5)


@pytest.fixture(scope="module")
def render(clicks, tmp_path_factory):
    """``render(*flags)`` -> the frames of that render as saved losslessly by --save_frames (cached
    per flags; H.264's look-ahead makes a decoded frame depend on later ones)."""
    from conftest import ENTRY_POINTS, load_module
    from sounddiffusion import cli

    module = load_module(ENTRY_POINTS["audio2video"], "entry_audio2video_bend")
    folder, done = tmp_path_factory.mktemp("bends"), {}

    def run(*flags):
        if flags not in done:
            output = folder / f"{len(done)}.mp4"
            argv = [str(a) for a in ("--path", clicks, *FAST, "--output", output, "--save_frames", *flags)]
            assert cli.run(module.main, module.build_parser(), argv) == 0
            pngs = sorted(output.with_name(f"{output.stem}-frames").glob("frame-*.png"))
            done[flags] = np.stack([np.asarray(Image.open(png)) for png in pngs])
        return done[flags]

    return run


def test_rms_bend_is_an_add_of_loudness(render):
    bent = render("--rms_bend", "0.8")
    assert np.array_equal(bent, render("--bend", "add=0.8*rms"))
    assert not np.array_equal(bent, render())


@pytest.mark.parametrize("flags", [("--bend", "multiply=1"), ("--bend", "add=0"), ("--bend", "rotate_x=0"),
                                   ("--bend", "noise=0@step=1"), ("--bend", "dilate=0@output_blocks.1"),
                                   ("--bend", "add=0*onset@middle_block")])
def test_identity_amounts_leave_every_frame_alone(render, flags):
    assert np.array_equal(render(*flags), render())


@pytest.mark.parametrize("flags", [("--bend", "rotate_z=0.8*beat@step=0.5"), ("--bend", "add=0.5"),
                                   ("--bend", "noise=0.3@input_blocks.1"), ("--bend", "invert=1@step=99")])
def test_bends_change_the_frames(render, clicks, flags):
    from sounddiffusion.settings import VideoSettings
    from sounddiffusion.video.frame_plan import plan_frames

    frames, plain = render(*flags), render()
    changed = [not np.array_equal(a, b) for a, b in zip(frames, plain)]
    amounts = plan_frames(VideoSettings(audio=str(clicks), fps=8, bend=(flags[1],))).bend_amounts[0]
    # the chain carries a change on: frames before the first bent one stay as they were
    first_bent = int(np.flatnonzero(amounts)[0]) if "add=" not in flags[1] else 1  # add acts from frame 1
    assert changed.index(True) == first_bent


@pytest.mark.parametrize("spec,words", [
    ("explode=1", ["--bend", "explode", "add", "rotate_z"]),
    ("add=1@input_blocks.99", ["--bend", "input_blocks.99", "input_blocks.0 to input_blocks."]),
    ("add=1@step=-2", ["--bend", "step"]),
    ("add=0.4 +* onset", ["--bend", "column"]),
    ("add", ["--bend", "="]),
    ("add=" + "0.1*onset + " * 500 + "+* 1", ["--bend", "column 6002", "expected a number"]),
    ("add=" + "(" * 150 + "1" + ")" * 150 + "@step=0.5", ["--bend", "column 101", "nested too deeply"]),
    ("add=1@step=" + "\u0661", ["--bend", "step", "neither an integer"]),
])
def test_bad_bend_is_one_line_before_the_model_loads(run_tool, clicks, tmp_path, monkeypatch, spec, words):
    monkeypatch.setattr(loop, "load_engine", lambda *a: pytest.fail("the model was loaded"))
    status, _, err = run_tool("audio2video", ["--path", clicks, "--bend", spec, "--outdir", tmp_path, *FAST])
    line = assert_one_line_error(status, err, "audio2video", *words)
    assert len(line) < 300, len(line)  # long specs are shown as excerpts


@pytest.mark.parametrize("flags,words", [
    (("--bend", "multiply=1e300"), ["--bend 'multiply=1e300'", "frame 0", "beyond float32's range"]),
    (("--bend", "add=1e39*(t > 3)@step=0.5"), ["frame 4", "the amount 1e+39"]),
    (("--rms_bend", "1e300"), ["--rms_bend", "frame 0", "beyond float32's range"]),
    (("--bend", "invert=0*t@step=1"), ["--bend 'invert=0*t@step=1'", "frame 0", "invert computes 1/amount"]),
])
def test_amounts_that_cannot_make_a_picture_are_one_line_before_the_model_loads(run_tool, clicks, tmp_path,
                                                                                 monkeypatch, flags, words):
    monkeypatch.setattr(loop, "load_engine", lambda *a: pytest.fail("the model was loaded"))
    status, _, err = run_tool("audio2video", ["--path", clicks, *flags, "--output", tmp_path / "x.mp4", *FAST])
    assert_one_line_error(status, err, "audio2video", *words)


def test_a_bend_that_makes_the_latent_infinite_stops_the_render_in_one_line(run_tool, clicks, tmp_path):
    # power=1000 of the final latent: inf wherever |x| > 1.07, which decoded to a black picture
    status, _, err = run_tool("audio2video", ["--path", clicks, "--bend", "power=1000@step=99",
                                              "--output", tmp_path / "x.mp4", *FAST])
    assert_one_line_error(status, err, "audio2video", "frame 0", "--bend 'power=1000@step=99' at 1000",
                          "infinite or NaN", "black picture", "smaller amounts")
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("flags", [("--rms_bend", "0.8"), ("--bend", "add=0.5"), ("--bend", "add=0.5@step=0"),
                                   ("--bend", "add=0.5@step=0.5"), ("--bend", "add=0.5@step=99"),
                                   ("--bend", "noise=0.5@output_blocks.1")])
def test_a_frame_that_runs_no_step_gets_no_bend_of_any_place(render, flags):
    # strength 0.1 x 2 steps: int(0.2) = 0 steps after frame 0, so each frame keeps frame 0's latent.
    # Before, latent bends and --rms_bend were dropped there while step and final bends still acted.
    # (Frame 0 is txt2img: its step, final and block bends act; latent bends wait for frame 1.)
    frames = render("--strength", "0.1", *flags)
    assert len(frames) == 12
    for frame in frames[1:]:
        assert np.array_equal(frame, frames[0])


def test_the_error_of_an_infinite_in_between_names_the_diffused_frame_it_comes_from(clicks):
    from sounddiffusion.settings import VideoSettings
    from sounddiffusion.video.frame_chain import nonfinite_latent_error
    from sounddiffusion.video.frame_plan import plan_frames

    plan = plan_frames(VideoSettings(audio=str(clicks), fps=8, cadence=3, bend=("multiply=2", "add=0")))
    message = str(nonfinite_latent_error(plan, 1))  # frames 1, 2 are made from frames 0 and 3
    assert message.startswith("frame 3: the bends (--bend 'multiply=2' at 2) made the latent infinite or NaN")
    plain = plan_frames(VideoSettings(audio=str(clicks), fps=8))
    assert str(nonfinite_latent_error(plain, 4)).startswith("frame 4: the model gave a latent that is infinite")
