"""Sound Diffusion: sound to images and music-reactive videos with Stable Diffusion v1.

The package holds everything the entry points share:

- ``audio``: loading, resampling and slicing sound (numpy only);
- ``features``: waveform / fft / melspectrogram / mfcc -> (77, D) matrices (numpy only);
- ``conditioning``: normalization, audio + text mixing, prompt schedules (torch);
- ``engine``: model loading for the command lines, txt2img / img2img, seeds;
- ``images``: PNG outputs with embedded parameters, grids, numbered names;
- ``video``: the ffmpeg pipe writer, previews and resumable render state;
- ``cli``: argparse groups shared by the entry points and the error-to-exit-code wrapper.
"""

__version__ = "1.0.0"
