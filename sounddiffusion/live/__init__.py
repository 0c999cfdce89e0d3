"""live.py: pictures from a sound as it plays (microphone or file), served on a local web page."""
