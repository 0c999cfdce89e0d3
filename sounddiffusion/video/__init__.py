"""audio2video: frame plan, frame loop, chain treatments, writing, resume, ffmpeg, measures."""
