"""Run settings as data: what each job needs, built by the entry points from their flags.

The jobs and the frame loop take these frozen dataclasses and never see argparse. Field names
are the command-line flags' names, so what a PNG or a video records (:meth:`JobSettings.parameters`)
reads like the command that made it, and a flag added here is recorded in the metadata and
checked by ``--resume`` without further code.

Defaults that belong to the installation (the default config, where checkpoints go) resolve
against this package's location, not the working directory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

from sounddiffusion.errors import ParameterError

REPO = Path(__file__).resolve().parents[1]
"""The installation: the folder that holds ``configs/``, ``models/`` and this package."""

DEFAULT_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
V2_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-inference.yaml"  # SD 2.x 512 base (eps)
V2_V_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-inference-v.yaml"  # SD 2.x 768-v (v-prediction)
DEMO_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-demo.yaml"
CHECKPOINT_DIR = REPO / "models" / "ldm" / "stable-diffusion-v1"
CHECKPOINT_NAMES = ("model.safetensors", "model.ckpt")
V2_CHECKPOINT_DIR = REPO / "models" / "ldm" / "stable-diffusion-v2"
"""SD 2.x files keep their own names there (a "768" in the name selects the v-prediction config)."""
DEFAULT_SIZE = 512  # what SD v1 was trained on
DEMO_SIZE = 256  # keeps the demo model quick on a CPU
PRECISIONS = ("auto", "full", "autocast", "fp16", "bf16")
DEVICES = ("auto", "cuda", "mps", "cpu")
MAX_FPS = 120
# The MP4's H.264 quality (libx264's constant rate factor): 0 best and largest .. 51 worst and smallest.
DEFAULT_CRF = 18
CRF_RANGE = (0, 51)
SAMPLERS = ("ddim", "plms", "lcm", "euler_a")
"""``--sampler``'s choices: CompVis's DDIM and PLMS, and the few-step LCM and Euler ancestral."""


def shown_path(path: Path) -> Path:
    """``path`` relative to the installation when inside it (as users type it there), else as is."""
    try:
        return path.relative_to(REPO)
    except ValueError:
        return path


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """Base of every job's settings. ``OUTPUT_FIELDS`` name the fields that change where results
    go or how they are shown, not what they look like; they stay out of :meth:`parameters`."""

    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def parameters(self) -> dict:
        """The settings that decide what the results look like, by flag name (JSON-ready)."""
        return {name: value for name, value in asdict(self).items() if name not in self.OUTPUT_FIELDS}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True, kw_only=True)
class ModelSettings(JobSettings):
    """Which model, where and in what precision (``--config --ckpt --vae --demo --device --precision
    --compile --cuda_graphs --lora``). ``config`` None: the default config; ``ckpt`` None: the checkpoint
    in :data:`CHECKPOINT_DIR`; ``vae`` None: the checkpoint's own (KL) autoencoder, else
    ``"taesd:PATH"``, the tiny autoencoder TAESD at PATH encodes and decodes pictures instead
    (:mod:`sounddiffusion.model.tiny_vae`). ``cuda_graphs``: replay the UNet from CUDA graphs (CUDA only).
    ``lora``: the ``--lora PATH[:WEIGHT]`` texts as given (:mod:`sounddiffusion.model.lora_specs`);
    outputs record each file by content (name, sha256, weight) instead of its path."""

    config: str | None = None
    ckpt: str | None = None
    vae: str | None = None
    demo: bool = False
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    cuda_graphs: bool = False
    lora: tuple[str, ...] = ()

    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset({"device", "compile", "cuda_graphs", "lora"})

    def __post_init__(self):
        object.__setattr__(self, "lora", tuple(str(text) for text in self.lora))


def pick_sampler(sampler: str | None, *, default: str, switch: str | None = None) -> str:
    """The sampler a run uses: ``--sampler`` when given, else the one the entry point's old switch
    names (``switch``: "plms" for ``--plms``, "ddim" for audio2video's ``--ddim``; None when the
    switch is off or absent), else ``default``. Raises ParameterError for an unknown name or a
    ``--sampler`` that contradicts the switch (``--plms --sampler lcm``)."""
    if sampler is not None and sampler not in SAMPLERS:
        raise ParameterError(f"--sampler {sampler}: use one of {', '.join(SAMPLERS)}")
    if switch is not None and sampler is not None and sampler != switch:
        raise ParameterError(f"--{switch} and --sampler {sampler} ask for two samplers: give only "
                             f"--sampler {sampler} (--{switch} is the same as --sampler {switch})")
    return sampler or switch or default


@dataclass(frozen=True, kw_only=True)
class SamplingSettings(JobSettings):
    """Sampler, denoising steps, eta, classifier-free guidance scale, seed and picture size in pixels.
    ``negative_prompt``: the text guidance pushes away from ("": the empty prompt, as without one).

    ``sampler``: one of :data:`SAMPLERS`; None picks the entry point's default
    (:meth:`_sampler_switch`, else ``DEFAULT_SAMPLER``), so that after construction it always
    names the sampler used and the metadata says which."""

    DEFAULT_SAMPLER: ClassVar[str] = "ddim"

    sampler: str | None = None
    ddim_steps: int = 50
    ddim_eta: float = 0.0
    scale: float = 7.5
    negative_prompt: str = ""
    seed: int = 42
    H: int = DEFAULT_SIZE
    W: int = DEFAULT_SIZE

    def __post_init__(self):
        object.__setattr__(self, "sampler", pick_sampler(self.sampler, default=self.DEFAULT_SAMPLER,
                                                         switch=self._sampler_switch()))

    def _sampler_switch(self) -> str | None:
        """The sampler an entry point's own switch (``--plms``, ``--ddim``) asks for, None when off."""
        return None


@dataclass(frozen=True, kw_only=True)
class AudioConditioningSettings(JobSettings):
    """How a sound becomes a conditioning: feature, normalization and the text mixed in."""

    feature: str = "fft"
    normalize: str = "clip"
    textprompt: str = ""
    textstrength: float = 0.5


@dataclass(frozen=True, kw_only=True)
class ClusterSettings(JobSettings):
    """Where a batch job runs: ``ray`` None in this process, ``"local"`` a local Ray instance,
    else a Ray cluster address (``auto``, ``ray://HOST:PORT``); ``ray_workers`` None: one worker
    per GPU, else one. Neither changes the pictures."""

    ray: str | None = None
    ray_workers: int | None = None

    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset({"ray", "ray_workers"})


@dataclass(frozen=True, kw_only=True)
class ImageSettings(SamplingSettings):
    """An image job (txt2img, img2img, audio2img): sampler, rounds and where the PNGs go.

    Image ``k`` of round ``r`` has the seed ``seed + r * n_samples + k`` (every round reuses
    round 0's seeds with ``fixed_code``). ``strength`` and ``init_img`` are img2img's."""

    plms: bool = False
    n_iter: int = 1
    n_samples: int = 1
    n_rows: int = 0
    fixed_code: bool = False
    outdir: str = "outputs"
    skip_grid: bool = False
    skip_save: bool = False
    strength: float | None = None
    init_img: str | None = None

    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset({"outdir", "skip_grid", "skip_save", "n_rows"})

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "plms", self.sampler == "plms")  # --plms and --sampler plms record alike

    def _sampler_switch(self) -> str | None:
        return "plms" if self.plms else None

    def image_seed(self, round_index: int, sample_index: int) -> int:
        """The seed of one image."""
        return self.seed + (0 if self.fixed_code else round_index * self.n_samples) + sample_index


@dataclass(frozen=True, kw_only=True)
class PromptImageSettings(ImageSettings):
    """txt2img / img2img: ``--prompt`` or the prompts of the ``--from-file`` list."""

    prompt: str = "a painting of a virus monster playing guitar"
    from_file: str | None = None

    OUTPUT_FIELDS: ClassVar[frozenset[str]] = ImageSettings.OUTPUT_FIELDS | {"from_file"}


@dataclass(frozen=True, kw_only=True)
class SoundImageSettings(ImageSettings, AudioConditioningSettings, ClusterSettings):
    """audio2img: one sound (``audio``), a folder of them or a list; ``batch_size`` sounds per call."""

    audio: str | None = None
    input_folder: str | None = None
    from_file: str | None = None
    batch_size: int = 4

    OUTPUT_FIELDS: ClassVar[frozenset[str]] = (ImageSettings.OUTPUT_FIELDS | ClusterSettings.OUTPUT_FIELDS
                                               | {"audio", "input_folder", "from_file", "batch_size"})


@dataclass(frozen=True, kw_only=True)
class VideoSettings(SamplingSettings, AudioConditioningSettings, ClusterSettings):
    """audio2video: the sound, the frame rate, how frames chain, and the output.

    The per-frame numbers (``strength``, ``scale``, ``textstrength``, ``rms_bend``, ``latent_noise``,
    ``contrast``, ``cadence``, ``color_coherence_strength``) are schedule texts: a number, or an
    expression or keyframes over the sound's envelopes (:mod:`sounddiffusion.control.frame_schedules`).
    ``strength``: how far each img2img frame departs from the previous one; ``rms_bend``: the
    slice's loudness x F added to the noised latent; ``seed_jump``: frames where it is > 0.5 take
    new img2img noise (held in between); ``bend``: network-bending specs, applied in order;
    ``ddim``: DDIM instead of PLMS (the default sampler here); ``pixel_roundtrip``: decode and re-encode every frame, as
    upstream did; ``color_coherence``: match each frame's colours to frame 0's (or the init
    image's) in this colour space before img2img, every ``color_coherence_every`` frames;
    ``cadence``: diffuse every Nth frame and make the ones between from their neighbours.
    The camera motion (``zoom``, ``angle``, ``translation_x``, ``translation_y``,
    ``transform_center_x``, ``transform_center_y``, ``perspective_flip_theta``/``_phi``/``_gamma``,
    ``perspective_flip_fv``: schedule texts, Deforum's 2D keys) moves the previous picture before
    each img2img step, with ``border`` filling the edges, in ``motion_space`` "pixel" (decode, warp,
    encode) or "latent" (:mod:`sounddiffusion.video.camera`). A still camera (:meth:`camera_moves`
    False) leaves them out of :meth:`parameters`, so such renders record, and resume, as before.
    ``input_folder``: a folder of songs, one video each (then ``audio`` is None until a song is
    picked). ``crf``: the MP4's H.264 quality (0 best and largest .. 51; :data:`DEFAULT_CRF`); it
    changes the video's pixels, so it is recorded and a resume must keep it. ``control``: control
    tracks, ``NAME=FILE`` each (recorded by content); ``bpm``, ``beat_offset``,
    ``beats_per_bar``: an exact beat grid instead of the tracker's beats (None: tracked), the bars'
    length either way; ``sections``: a file of timed section labels, ``auto`` or ``auto:N``
    (recorded as the sections it gave) (:mod:`sounddiffusion.sound.music_flags`)."""

    audio: str | None = None
    input_folder: str | None = None
    fps: float = 12.0
    strength: str = "0.5"
    scale: str = "7.5"
    textstrength: str = "0.5"
    textpromptend: str | None = None
    prompt_file: str | None = None
    snap_prompts: str = "none"
    control: tuple[str, ...] = ()
    bpm: float | None = None
    beat_offset: float | None = None
    beats_per_bar: int = 4
    sections: str | None = None
    init_img: str | None = None
    rms_bend: str = "0"
    seed_jump: str | None = None
    bend: tuple[str, ...] = ()
    smoothing: str | None = None
    color_coherence: str = "none"
    color_coherence_every: int = 1
    color_coherence_strength: str = "1"
    cadence: str = "1"
    cadence_blend: str = "latent"
    latent_noise: str = "0"
    contrast: str = "1"
    zoom: str = "1"
    angle: str = "0"
    translation_x: str = "0"
    translation_y: str = "0"
    transform_center_x: str = "0.5"
    transform_center_y: str = "0.5"
    border: str = "replicate"
    perspective_flip_theta: str = "0"
    perspective_flip_phi: str = "0"
    perspective_flip_gamma: str = "0"
    perspective_flip_fv: str = "53"
    motion_space: str = "pixel"
    ddim: bool = False
    pixel_roundtrip: bool = False
    outdir: str = "outputs/audio2video"
    output: str | None = None
    save_frames: bool = False
    crf: int = DEFAULT_CRF
    preview_every: float = 0.0
    resume: bool = False
    plot: bool = False
    dry_run: bool = False
    ddim_steps: int = 25

    # The sound, the init image, the control tracks and the sections are identified by content in
    # the render's settings instead.
    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"audio", "init_img", "prompt_file", "control", "sections", "outdir", "output", "save_frames",
         "preview_every", "resume", "plot", "dry_run", "input_folder", *ClusterSettings.OUTPUT_FIELDS})

    DEFAULT_SAMPLER: ClassVar[str] = "plms"

    # The motion flags, and the values of those that move the camera when they differ from these.
    MOTION_FIELDS: ClassVar[tuple[str, ...]] = (
        "zoom", "angle", "translation_x", "translation_y", "transform_center_x", "transform_center_y", "border",
        "perspective_flip_theta", "perspective_flip_phi", "perspective_flip_gamma", "perspective_flip_fv",
        "motion_space")
    STILL_CAMERA: ClassVar[dict[str, float]] = {
        "zoom": 1.0, "angle": 0.0, "translation_x": 0.0, "translation_y": 0.0, "perspective_flip_theta": 0.0,
        "perspective_flip_phi": 0.0, "perspective_flip_gamma": 0.0}

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "ddim", self.sampler == "ddim")  # --ddim and --sampler ddim record alike
        # Numbers given in code (not from the command line) are kept as the text of the number.
        for name in ("strength", "scale", "textstrength", "rms_bend", "color_coherence_strength", "cadence",
                     "latent_noise", "contrast", *self.MOTION_FIELDS):
            value = getattr(self, name)
            if not isinstance(value, str):
                object.__setattr__(self, name, repr(float(value)) if isinstance(value, float) else str(value))
        object.__setattr__(self, "bend", tuple(self.bend))
        object.__setattr__(self, "control", tuple(self.control))
        object.__setattr__(self, "fps", float(self.fps))

    def _sampler_switch(self) -> str | None:
        return "ddim" if self.ddim else None

    def camera_moves(self) -> bool:
        """False when every motion flag that moves the camera is a number that keeps it still
        (zoom 1, no turn, no shift, no flip); a schedule counts as moving."""
        for name, still in self.STILL_CAMERA.items():
            try:
                if float(getattr(self, name)) != still:
                    return True
            except ValueError:
                return True
        return False

    def parameters(self) -> dict:
        """:meth:`JobSettings.parameters`, without the motion flags when the camera stands still:
        what a still render records (metadata, resume check, batch keys) is what it was before
        camera motion existed, whatever centre, border or space was given."""
        recorded = super().parameters()
        if not self.camera_moves():
            for name in self.MOTION_FIELDS:
                recorded.pop(name)
        return recorded

    def requested_output(self) -> Path:
        """``output``, or OUTDIR/<sound name>.mp4 (the render numbers it if the name is taken)."""
        return Path(self.output) if self.output else Path(self.outdir) / (Path(self.audio).stem + ".mp4")

    def report_path(self, suffix: str) -> Path:
        """``NAME.schedule.csv`` / ``.png`` next to the requested output."""
        path = self.requested_output()
        return path.with_name(f"{path.stem}.schedule{suffix}")


LIVE_HOST = "127.0.0.1"
LIVE_PORT = 8765


@dataclass(frozen=True, kw_only=True)
class LiveSettings(VideoSettings):
    """live.py: audio2video's frame chain on a sound that arrives as it plays, shown on a web page.

    The chain's numbers are :class:`VideoSettings`' (their schedules read envelopes computed as the
    sound arrives, :mod:`sounddiffusion.live.envelopes`); its file-only fields (``audio``, ``outdir``,
    ``cadence``, ``resume``, ...) keep their defaults. ``fps``: the rate the envelopes and schedules
    count frames in (``t``, keyframes) and the recording's frame rate; the pictures come as fast as
    the machine makes them. ``input``: ``"mic"`` (the default input device, or ``device_index``)
    or a sound file played in real time (``loop``: again and again). ``host``/``port``: where the
    page is served. ``record``: an MP4 of what was shown with the sound. ``seconds``: stop after
    this much sound (None: at Ctrl-C or the file's end). ``rest``: the loop rests while no
    envelope has changed by more than this since the last picture (0: never rests)."""

    input: str = "mic"
    loop: bool = False
    device_index: int | None = None
    host: str = LIVE_HOST
    port: int = LIVE_PORT
    record: str | None = None
    seconds: float | None = None
    rest: float = 0.02
    ddim_steps: int = 4

    # DDIM works with any checkpoint; --sampler lcm (an LCM model or LCM-LoRA) or euler_a (SD-Turbo)
    # are faster where the model was made for them (README: Live).
    DEFAULT_SAMPLER: ClassVar[str] = "ddim"

    OUTPUT_FIELDS: ClassVar[frozenset[str]] = VideoSettings.OUTPUT_FIELDS | {
        "input", "loop", "device_index", "host", "port", "record", "seconds"}
