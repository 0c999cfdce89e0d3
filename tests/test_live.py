"""live.py end to end: the demo model on a sound file played in real time, served on a free port.

One live.py process, with a control track shorter than its looping input, serves the tests of
the page (status, pictures, the WebSocket stream, settings, a real headless browser, the track's
meters) and is then stopped with Ctrl-C, which must finish its recording; a second one, on all interfaces, must refuse every request without its token, rest on
silence and stop by itself after --seconds. Nothing waits on a fixed delay alone: every wait polls
for what it needs with a generous deadline."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_checks import click_track, decoded_frames, write_sound
from conftest import REPO, in_ci
from sounddiffusion.sound.analysis import ENVELOPE_NAMES
from video_probe import probe_video

pytestmark = pytest.mark.slow  # live.py in a real process, a browser: python -m pytest -m slow (CI runs them)

START_S = 300  # model load and warm-up on a busy 2-core machine
WAIT_S = 120
CHROMIUM = "/usr/bin/chromium"
FAST = ["--demo", "--H", "64", "--W", "64", "--fps", "12"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A live.py process: its output lines as they come, HTTP to its port."""

    def __init__(self, args: list, port: int):
        self.port, self.lines, self.errors = port, [], []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, str(REPO / "live.py"), *map(str, args), "--port", str(port)],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for stream, into in ((self.process.stdout, self.lines), (self.process.stderr, self.errors)):
            threading.Thread(target=lambda s=stream, i=into: i.extend(s), daemon=True).start()
        self.url = self._wait(lambda: next((m.group(1) for line in self.lines
                                            if (m := re.search(r"open (http://\S+)", line))), None), START_S)

    def _wait(self, found, seconds: float):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = found()
            if value:
                return value
            if self.process.poll() is not None and not found():
                time.sleep(0.5)  # let the readers take the last lines
                raise AssertionError(f"live.py ended ({self.process.returncode}): {self.lines} {self.errors}")
            time.sleep(0.1)
        raise AssertionError(f"timed out; stdout {self.lines[-5:]} stderr {self.errors[-5:]}")

    def request(self, path: str, *, data=None, headers=None, token: str | None = None):
        """(status, headers, body bytes) of a request to 127.0.0.1."""
        if token is not None:
            path += ("&" if "?" in path else "?") + f"token={token}"
        body = json.dumps(data).encode() if data is not None and not isinstance(data, bytes) else data
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as answer:
            return answer.code, answer.headers, answer.read()

    def status(self) -> dict:
        code, _, body = self.request("/status")
        assert code == 200, body
        return json.loads(body)

    def wait_for_picture(self, after: int = 0) -> tuple[int, bytes]:
        """The first picture numbered above ``after``: (number, JPEG bytes)."""
        def newer():
            code, headers, body = self.request("/frame.jpg")
            number = int(headers.get("X-Frame-Number", 0)) if code == 200 else 0
            return (number, body) if number > after else None
        return self._wait(newer, WAIT_S)

    def stop(self, sig=signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=WAIT_S)


def pixels(jpeg: bytes) -> np.ndarray:
    from io import BytesIO

    return np.asarray(Image.open(BytesIO(jpeg)).convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("live")
    sound = click_track(folder / "clicks.wav", seconds=4.0, bpm=120)
    drums = click_track(folder / "drums.wav", seconds=1.5, bpm=240)  # ends within each pass of the input
    run = Live([*FAST, "--input", sound, "--loop", "--rest", "0", "--record", folder / "shown.mp4",
                "--control", f"drums={drums}"], free_port())
    run.folder = folder
    yield run
    if run.process.poll() is None:
        run.process.kill()
        run.process.wait()


def test_status_counts_pictures_and_reports_fps_and_latency(live):
    live.wait_for_picture(after=2)
    status = live.status()
    assert status["frames"] >= 3 and status["fps"] > 0 and 0 < status["latency_ms"] < 60_000
    assert set(status["envelopes"]) == set(ENVELOPE_NAMES)
    assert all(0 <= value <= 1 for value in status["envelopes"].values())
    assert status["width"] == 64 and status["seconds"] > 0
    assert list(status["tracks"]) == ["drums"] and set(status["tracks"]["drums"]) == set(ENVELOPE_NAMES)
    assert all(0 <= value <= 1 for value in status["tracks"]["drums"].values())
    assert 0 <= status["bar"] <= 1 and status["beat_in_bar"] in range(4)
    assert status["controls"] == {"prompt": "", "textstrength": "0.5", "strength": "0.5", "seed": 42}


def test_two_pictures_a_second_apart_differ(live):
    first, jpeg = live.wait_for_picture()
    time.sleep(1.0)
    _, later = live.wait_for_picture(after=first)
    assert np.abs(pixels(later) - pixels(jpeg)).mean() > 1.0


def test_the_websocket_streams_each_new_picture(live):
    import aiohttp

    async def two_pictures():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{live.port}/ws", timeout=WAIT_S) as ws:
                return [await ws.receive_bytes(timeout=WAIT_S) for _ in range(2)]

    pictures = asyncio.run(two_pictures())
    assert all(p[:2] == b"\xff\xd8" for p in pictures)  # JPEG
    assert pixels(pictures[0]).shape == (64, 64, 3) and pictures[0] != pictures[1]


def test_a_bad_setting_answers_400_with_one_line_and_the_loop_goes_on(live):
    before = live.status()["controls"]
    for data, words in ((({"strength": "0.3 +* onset"}), "--strength"), ({"seed": "x"}, "seed"),
                        ({"volume": 1}, "unknown control"), (b"{not json", "not JSON")):
        code, _, body = live.request("/settings", data=data)
        text = body.decode()
        assert code == 400 and text.count("\n") == 1 and words in text, (code, text)
    code, _, body = live.request("/settings", data=b'{"seed": 1}', headers={"Content-Type": "text/plain"})
    assert code == 415
    assert live.status()["controls"] == before
    number, _ = live.wait_for_picture()
    live.wait_for_picture(after=number)


def test_a_setting_changes_the_next_pictures(live):
    """Strength 0 keeps the previous picture: once it applies, every next picture is the same;
    back at 0.5 they change again."""
    code, _, body = live.request("/settings", data={"strength": 0, "textstrength": "0.2 + 0.5*onset"})
    assert code == 200 and json.loads(body)["strength"] == "0.0"
    assert live.status()["controls"]["textstrength"] == "0.2 + 0.5*onset"
    number, _ = live.wait_for_picture()
    number, frozen = live.wait_for_picture(after=number)  # made after the change
    number, again = live.wait_for_picture(after=number)
    assert again == frozen
    assert live.request("/settings", data={"strength": "0.5", "seed": 3})[0] == 200
    number, _ = live.wait_for_picture(after=number)
    number, moving = live.wait_for_picture(after=number)
    _, moved = live.wait_for_picture(after=number)
    assert np.abs(pixels(moved) - pixels(moving)).mean() > 0.5


def test_a_request_for_another_host_is_refused(live):
    """A page elsewhere cannot reach 127.0.0.1 through a DNS name of its own."""
    code, _, body = live.request("/status", headers={"Host": f"attacker.example:{live.port}"})
    assert code == 403 and b"127.0.0.1" in body


def _browser():
    """Chromium from the system packages and Playwright (never its own browsers); CI must have them."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        message = "needs Debian's chromium (apt-get install chromium) and playwright (requirements-dev.txt)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return sync_playwright


SHOWN_JS = """async () => {
  const picture = document.getElementById('picture');
  const src = picture.src;
  await picture.decode();  // rejects when the src changes before it is decoded
  return src;
}"""
DECODED_JS = """(src) => {
  const picture = document.getElementById('picture');
  if (picture.src !== src) return null;  // a newer picture came meanwhile
  const canvas = document.createElement('canvas');
  canvas.width = picture.naturalWidth;
  canvas.height = picture.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(picture, 0, 0);
  return Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);
}"""


def poll_page(page, expression: str, seconds: float = WAIT_S, arg=None):
    """The first truthy value of ``expression`` evaluated in ``page`` (DevTools evaluation, which the
    page's Content-Security-Policy allows, unlike Playwright's wait_for_function)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = page.evaluate(expression, arg)
        except Exception as error:  # noqa: BLE001 - a decode cut short by a newer picture: look again
            if "decode" not in str(error).lower() and "encoding" not in str(error).lower():
                raise
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting in the page for {expression}")


def test_the_page_shows_the_picture_in_a_headless_browser(live, tmp_path):
    """With the page's own Content-Security-Policy in force: the picture on the screen is the
    JPEG the page received over the stream."""
    sync_playwright = _browser()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    received = []  # the JPEGs of the stream, as the browser got them
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=flags, viewport={"width": 640, "height": 480})
        try:
            page = browser.new_page()
            page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: received.append(payload)))
            page.goto(live.url)
            # pictures come over the stream, and the numbers from /status
            poll_page(page, "document.getElementById('picture').naturalWidth === 64 && "
                            "Number(document.getElementById('frames').textContent) > 0")
            first = page.evaluate("document.getElementById('picture').src")
            poll_page(page, "(first) => document.getElementById('picture').src !== first", arg=first)
            meters = page.locator("#meters .meter").count()
            track_meters = page.locator("#tracks .track[data-track=drums] .meter").count()
            track_name = page.locator("#tracks .track .name").text_content()
            fps = page.evaluate("document.getElementById('fps').textContent")
            page.evaluate("document.getElementById('panel').style.visibility = 'hidden'")  # it floats over the picture
            box = page.locator("#picture").bounding_box()
            for _ in range(50):  # a picture that stays on show from before the screenshot to after it
                src = poll_page(page, SHOWN_JS)
                page.screenshot(path=str(tmp_path / "page.png"))
                decoded = page.evaluate(DECODED_JS, src)
                if decoded is not None:
                    break
            else:
                raise AssertionError("the picture never stayed on show through a screenshot")
        finally:
            browser.close()
    assert first.startswith("blob:") and src.startswith("blob:") and meters == len(ENVELOPE_NAMES)
    assert track_meters == len(ENVELOPE_NAMES) and track_name == "drums" and fps != "–"
    assert box["width"] >= 400 and box["height"] >= 400  # as large as the window allows
    shown = np.array(decoded, dtype=np.float64).reshape(64, 64, 4)[..., :3]
    # it is a picture of the stream (Chrome's JPEG decoder and PIL's may differ by a level)
    nearest = min(np.abs(shown - pixels(jpeg)).mean() for jpeg in received if isinstance(jpeg, bytes))
    # the screen shows it, scaled to the largest square the box holds (object-fit: contain)
    side = min(box["width"], box["height"])
    left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
    screen = Image.open(tmp_path / "page.png").convert("RGB").crop((round(left), round(top), round(left + side),
                                                                    round(top + side)))
    on_screen = np.asarray(screen.resize((64, 64), Image.BOX), dtype=np.float64)
    assert nearest < 1.0 and shown.std() > 10, (nearest, shown.std())
    assert np.abs(on_screen - shown).mean() < 2.0  # 0.4 here; pictures a second apart differ by 10 or so


def test_ctrl_c_stops_cleanly_and_finishes_the_recording(live):
    number = 0
    while number < 5 or live.status()["seconds"] < 6:  # a recording mostly of pictures
        number, _ = live.wait_for_picture(after=number)
    assert live.stop(signal.SIGINT) == 0, live.errors
    summary = next(line for line in live.lines if re.match(r"live: \d+ pictures", line))
    pictures, seconds = re.match(r"live: (\d+) pictures in ([\d.]+) s", summary).groups()
    recording = Path(next(line for line in live.lines if line.startswith("live: recorded ")).split("recorded ")[1].strip())
    assert recording == live.folder / "shown.mp4"
    info = probe_video(recording)
    assert info["has_audio"] and info["fps"] == 12 and info["width"] == 64
    assert info["frames"] == pytest.approx(float(seconds) * 12, abs=2)
    assert info["audio_duration"] == pytest.approx(info["frames"] / 12, abs=0.1)
    frames = decoded_frames(recording).astype(np.float64)
    shown = frames.reshape(len(frames), -1).mean(axis=1) > 10  # black until the first picture
    assert shown[-1] and shown.mean() > 0.5, frames.reshape(len(frames), -1).mean(axis=1).round()
    assert len({f.tobytes() for f in frames[shown].astype(np.uint8)}) > 5
    assert int(pictures) >= 5
    assert not list(live.folder.glob(".shown.mp4.live-*"))
    # the control track ended on both passes of the input (at 1.5 s and 5.5 s), and said so once
    ended = [line for line in live.errors if "control track drums" in line]
    assert len(ended) == 1 and "silent" in ended[0], live.errors


def test_on_the_network_every_request_needs_the_token_and_silence_rests(tmp_path):
    silence = write_sound(tmp_path / "silence.wav", seconds=1.0, kind="silence")
    run = Live([*FAST, "--input", silence, "--loop", "--host", "0.0.0.0", "--seconds", "12"], free_port())
    try:
        token = re.search(r"\?token=([\w-]+)", run.url).group(1)
        assert any("reachable from the network" in line for line in run.errors)
        for path in ("/", "/status", "/frame.jpg", "/live.js"):
            assert run.request(path)[0] == 403
            assert run.request(path, token="x" + token[1:])[0] == 403
        code, _, body = run.request("/settings", data={"strength": 1}, token="wrong")
        assert code == 403 and b"token" in body
        assert run.request("/status", token=token)[0] == 200
        code, headers, _ = run.request("/", token=token)
        cookie = headers["Set-Cookie"].split(";")[0]
        assert code == 200 and "HttpOnly" in headers["Set-Cookie"]
        assert run.request("/status", headers={"Cookie": cookie})[0] == 200
        assert json.loads(run.request("/status", token=token)[2])["controls"]["strength"] == "0.5"

        import aiohttp

        async def connect(query):
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.ws_connect(f"http://127.0.0.1:{run.port}/ws{query}", timeout=WAIT_S):
                        return 101
                except aiohttp.WSServerHandshakeError as refused:
                    return refused.status

        assert asyncio.run(connect("")) == 403 and asyncio.run(connect(f"?token={token}")) == 101
        assert run.process.wait(timeout=START_S) == 0, run.errors  # --seconds 12 ends it
    finally:
        run.stop(signal.SIGKILL)
    summary = next(line for line in run.lines if re.match(r"live: \d+ pictures", line))
    pictures, rested = re.search(r"(\d+) pictures .* (\d+) frames rested", summary).groups()
    assert int(pictures) == 1 and int(rested) > 0, summary  # silence never changes: one picture, then rest


def test_benchmark_live_writes_its_table(tmp_path):
    """scripts/benchmark_live.py runs live.py's loop and writes the table PERFORMANCE.md copies."""
    out = tmp_path / "bench.md"
    done = subprocess.run([sys.executable, "scripts/benchmark_live.py", "--sizes", "64", "--seconds", "3",
                           "--ways", "ddim:4:7.5", "lcm:4:1", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=2 * START_S)
    assert done.returncode == 0, done.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 64x64")]
    assert len(rows) == 2
    for row, way in zip(rows, ("ddim 4 x 0.5 = 2, scale 7.5 (4 UNet rows)", "lcm 4 x 0.5 = 4, scale 1 (4 UNet rows)")):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        pictures, seconds, fps = int(cells[3]), float(cells[4]), float(cells[5])
        assert pictures >= 1 and seconds == 3.0 and fps == pytest.approx(pictures / seconds, abs=0.01)
        assert cells[1] == way and int(cells[12]) == 0  # --rest 0: never rests


def benchmark_row(folder: Path, *args) -> list[str]:
    """The cells of the one row scripts/benchmark_live.py writes for 64x64 DDIM with ``args``."""
    out = folder / f"bench-{len(list(folder.glob('bench-*')))}.md"
    done = subprocess.run([sys.executable, "scripts/benchmark_live.py", "--sizes", "64", "--ways", "ddim:4:7.5",
                           "--device", "cpu", "--out", str(out), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=2 * START_S)
    assert done.returncode == 0, done.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 64x64")]
    assert len(rows) == 1
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_benchmark_live_times_only_the_pictures_and_takes_a_run_without_any(tmp_path):
    """--rest 1 rests after the first picture (no envelope moves by more than 1): "making one" is
    that picture's time, close to its latency, not its mean with the rests. 0.01 s of sound
    completes no frame: no picture, and the row says so."""
    cells = benchmark_row(tmp_path, "--seconds", "3", "--rest", "1")
    pictures, making, latency, rested = int(cells[3]), float(cells[6]), float(cells[7]), int(cells[12])
    assert pictures == 1 and rested > 10
    assert 0.5 * latency <= making <= latency + 1, cells  # (whole ms)
    cells = benchmark_row(tmp_path, "--seconds", "0.01")
    assert cells[3] == "0" and cells[5] == "0.00" and cells[6:11] == ["–"] * 5, cells
