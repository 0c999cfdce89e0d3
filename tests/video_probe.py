"""What the tests read of a video file: frames, rate, size, codecs and the sound in it (not a test module)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import imageio_ffmpeg

from sounddiffusion.video.ffmpeg import ffmpeg_exe


def probe_video(path: str | os.PathLike) -> dict:
    """Describe a video file (imageio-ffmpeg has no ffprobe).

    Returns a dict: ``frames`` (int, counted by decoding), ``fps`` (float, as ffmpeg prints
    it, 2 decimals), ``duration`` (s, the container's), ``video_duration`` (s, decoded),
    ``width``, ``height`` (px), ``video_codec``, ``pix_fmt`` (str), ``has_audio`` (bool) and,
    with sound, ``audio_codec`` (str), ``sample_rate`` (Hz) and ``audio_duration`` (s, from the
    count of decoded samples). The stream facts come from the text of ``ffmpeg -i``. Raises
    ValueError when ffmpeg cannot read ``path`` as a video.
    """
    path = Path(path)
    header = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace").stderr
    duration = re.search(r"Duration: (\d+):(\d+):(\d+\.\d+)", header)
    video = re.search(r"Stream #\d+:\d+.*?: Video: (\w+)[^,]*, (\w+)(?:\([^)]*\))?, "
                      r"(\d+)x(\d+).*?([\d.]+) fps", header)
    if duration is None or video is None:
        raise ValueError(f"{path} is not a video ffmpeg can read:\n{header.strip()}")
    frames, video_seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    info = {"frames": frames, "fps": float(video.group(5)),
            "duration": _seconds(*duration.groups()), "video_duration": video_seconds,
            "width": int(video.group(3)), "height": int(video.group(4)),
            "video_codec": video.group(1), "pix_fmt": video.group(2), "has_audio": False}
    audio = re.search(r"Stream #\d+:\d+.*?: Audio: (\w+)[^,]*, (\d+) Hz", header)
    if audio:
        sample_rate = int(audio.group(2))
        samples = subprocess.run(
            [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", str(path), "-map", "0:a:0",
             "-ac", "1", "-f", "s16le", "pipe:1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        info.update(has_audio=True, audio_codec=audio.group(1), sample_rate=sample_rate,
                    audio_duration=len(samples) / 2 / sample_rate)
    return info


def _seconds(hours: str, minutes: str, seconds: str) -> float:
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
