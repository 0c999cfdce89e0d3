"""Sound Diffusion: sound to images and music-reactive videos with Stable Diffusion v1.x and 2.x.

The package holds everything the entry points share, a sub-package per concern, each importing
only from the ones listed before it (docs/ARCHITECTURE.md):

- base modules: ``errors`` (mistakes users can fix), ``settings`` (run settings as frozen
  dataclasses), ``files`` (atomic writes, unique names), ``images`` (PNGs with their parameters),
  ``flags`` (command-line flags as data), ``logs`` (what a run prints);
- ``sound``: loading and slicing sound, envelopes and beats, (77, D) features (numpy only);
- ``control``: schedules over the music, prompt files, network bending;
- ``model``: checkpoint loading, the ``Engine`` that samples, conditioning, CUDA graphs;
- ``video``: audio2video's frame plan, loop, chain treatments, writing, resume, ffmpeg, measures;
- ``jobs``: image jobs, batches of sounds, Ray, the manifest of finished items;
- ``live``: live.py's loop on a sound as it plays (microphone or file), its envelopes, controls
  and the local web page;
- ``cli``: the argparse layer the entry points share, errors -> one line and exit status 2.
"""

__version__ = "1.0.0"
