"""What happens to a video frame's latent besides img2img itself.

Before img2img (frames after the first), the previous frame's latent may be moved by the camera
(:mod:`sounddiffusion.video.camera`), colour-matched to the reference picture
(``--color_coherence``), have its contrast scaled (``--contrast``) and get fresh seeded noise
(``--latent_noise``): :func:`prepare_previous`. During img2img, network bends
(``--bend``, and ``--rms_bend`` as an ``add`` of loudness x F) change the noised latent, the
latent before a chosen step, or the final latent: :func:`frame_bends` says which apply to a frame,
:func:`bend` applies them. Bends inside UNet blocks run through
:class:`sounddiffusion.control.bending_specs.BlockBender` hooks, whose amounts the loop sets per frame.
A frame whose ``int(strength x steps)`` is 0 runs no denoising step: img2img returns its starting
latent, and no bend of any place applies to it (there is no noised latent, no step and no UNet
pass to bend, and a bend of a frame that nothing denoises would compound frame after frame).
:func:`nonfinite_latent_error` is the one-line error for a frame whose latent the bends (or the
model) made infinite or NaN, which would decode to a black picture.

Everything random is seeded from (``--seed``, frame, what), so a resumed render redoes a frame
exactly; amounts are host floats from the plan, so nothing here reads values back from the GPU.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sounddiffusion.control.bending import apply, is_identity
from sounddiffusion.control.bending_specs import BendSpec, step_index
from sounddiffusion.errors import ParameterError
from sounddiffusion.model.engine import Engine
from sounddiffusion.model.samplers import img2img_step_count
from sounddiffusion.video.camera import CameraMove
from sounddiffusion.video.color import adjust_contrast, match_colors
from sounddiffusion.video.frame_plan import Frame, FramePlan

_NOISE_STREAM = 0  # the stream of --latent_noise; bend i draws from stream i + 1


def stream_generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for frame ``index``'s random stream ``stream``, derived from ``seed``."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, index, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


@dataclass(frozen=True)
class ChainState:
    """Where the chain of frames stands after a frame: the last diffused frame's ``index`` (-1
    before the first) and ``latent`` (1, 4, h, w) (None: the next frame is txt2img), and the
    colour-coherence ``reference`` picture (H, W, 3) uint8 or None."""

    index: int = -1
    latent: torch.Tensor | None = None
    reference: np.ndarray | None = None

    def resume_data(self) -> tuple[dict[str, np.ndarray], dict]:
        """The arrays and JSON the render saves with a finished frame to continue from it."""
        arrays = {"latent": self.latent.float().cpu().numpy()} if self.latent is not None else {}
        if self.reference is not None:
            arrays["reference"] = self.reference
        return arrays, {"chain_index": self.index}

    @classmethod
    def from_resume_data(cls, arrays: dict[str, np.ndarray], extra: dict, engine: Engine) -> ChainState:
        latent = torch.from_numpy(arrays["latent"]).to(engine.device, engine.dtype) if "latent" in arrays else None
        return cls(index=int(extra["chain_index"]), latent=latent, reference=arrays.get("reference"))


@dataclass(frozen=True)
class Bend:
    """One bend of one frame: the operator, its amount for this frame, and which random stream
    a seeded operator draws from."""

    op: str
    amount: float
    stream: int


@dataclass
class FrameBends:
    """A frame's bends by place: on the noised latent, before step i, on the final latent."""

    noised: list[Bend] = field(default_factory=list)
    steps: dict[int, list[Bend]] = field(default_factory=dict)
    final: list[Bend] = field(default_factory=list)


def steps_of_frame(frame: Frame, sampler: str, steps: int, *, first: bool) -> int:
    """How many denoising steps the frame runs: all for txt2img (the first frame without an init
    picture, or strength 1), else what img2img at its strength runs with ``sampler`` (DDIM/PLMS:
    ``int(strength * steps)`` as upstream; :func:`~sounddiffusion.model.samplers.img2img_step_count`)."""
    return steps if first else img2img_step_count(sampler, steps, frame.strength)


def frame_bends(specs: Sequence[BendSpec], frame: Frame, loudness: float, n_steps: int, *, first: bool
                ) -> FrameBends:
    """The bends of ``frame`` (``specs``: the run's ``--bend`` specs, one amount each in
    ``frame.bend_amounts``; ``loudness``: its slice's RMS) sorted by place, in the order given,
    ``--rms_bend`` first. The first frame of a render has no noised latent: its latent bends wait.
    An img2img frame of ``n_steps`` 0 has none at all (see the module docstring)."""
    bends = FrameBends()
    if not first and n_steps == 0:
        return bends
    if not first:
        bends.noised.append(Bend("add", loudness * frame.rms_bend, 0))
    for number, (spec, amount) in enumerate(zip(specs, frame.bend_amounts)):
        bend_now = Bend(spec.op, amount, number + 1)
        if spec.where == "latent":
            if not first:
                bends.noised.append(bend_now)
        elif spec.where == "step":
            at = step_index(spec, n_steps)
            (bends.final if at >= n_steps else bends.steps.setdefault(at, [])).append(bend_now)
    return bends


def bend(x: torch.Tensor, bends: list[Bend], seed: int, index: int) -> torch.Tensor:
    """``x`` with ``bends`` applied in order (frame ``index``'s random streams)."""
    for one in bends:
        x = apply(one.op, x, one.amount, generator=stream_generator(seed, index, one.stream))
    return x


def nonfinite_latent_error(plan: FramePlan, index: int) -> ParameterError:
    """The error for frame ``index`` whose latent is not finite: it names the diffused frame the
    latent comes from (``index`` itself, or the next diffused one for an in-between) and that
    frame's bends with their amounts, or says that the model gave it when no bend acted."""
    source = index if plan.diffused[index] else plan.next_diffused(index)
    frame = plan.frame(source)
    acting = [f"--rms_bend {frame.rms_bend:g}"] if frame.rms_bend else []
    acting += [f"--bend {spec.text or spec.op!r} at {amount:g}" for spec, amount in zip(plan.bends, frame.bend_amounts)
               if not is_identity(spec.op, amount)]
    if acting:
        return ParameterError(f"frame {source}: the bends ({', '.join(acting)}) made the latent infinite or NaN, "
                              f"which decodes to a black picture: use smaller amounts")
    return ParameterError(f"frame {source}: the model gave a latent that is infinite or NaN, which decodes to a "
                          f"black picture; with --precision fp16, bf16 or autocast try --precision full")


def block_specs(specs: Sequence[BendSpec]) -> list[BendSpec]:
    """The bends of ``specs`` that act inside UNet blocks."""
    return [spec for spec in specs if spec.is_block]


def prepare_previous(engine: Engine, previous: torch.Tensor, frame: Frame, reference: np.ndarray | None,
                     color_space: str, seed: int, move: CameraMove | None = None,
                     decoded: Callable[[], np.ndarray] | None = None) -> torch.Tensor:
    """The previous latent (1, 4, h, w) as frame ``frame``'s img2img starts from it, in Deforum's
    order: moved by the camera (``move``, from the previous diffused frame to this one; None: a
    still camera), colours matched to ``reference`` (H, W, 3 uint8) in ``color_space`` when the
    frame asks for it, contrast scaled, fresh noise added. A picture move and the colour match
    share one decode and encode; ``decoded``, when given, returns ``previous`` decoded, (1, H, W, 3)
    uint8, from the caller's cache, called only when the picture is needed (default: decoded by
    ``engine``). Identity amounts and a still camera change nothing."""
    match = frame.match_colors and reference is not None and frame.color_coherence_strength > 0
    if move is not None and move.space == "latent":
        previous = move.warp_latent(previous)
        decoded = None  # the moved latent's picture is another one
    if match or (move is not None and move.space == "pixel"):
        picture = decoded() if decoded is not None else engine.decode(previous)
        if move is not None and move.space == "pixel":
            picture = move.warp_pictures(picture, engine.device)
        if match:
            picture = match_colors(picture[0], reference, space=color_space,
                                   strength=frame.color_coherence_strength)[None]
        previous = engine.encode_image(picture)
    if frame.contrast != 1:
        previous = adjust_contrast(previous, frame.contrast)
    if frame.latent_noise > 0:
        previous = latent_noise(previous, frame.latent_noise, stream_generator(seed, frame.index, _NOISE_STREAM))
    return previous


def latent_noise(latent: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """``latent + amount · ε`` with ε standard normal noise drawn from ``generator``.

    ``--latent_noise F`` adds it to the chained latent before each img2img step, as Deforum's
    noise schedule does to the previous picture: fresh detail for the sampler to work on, which
    keeps a long chain from settling into smooth, burnt-in blobs. ``amount`` is in latent units
    (SD latents have a standard deviation of about 1); 0.01..0.05 is subtle. ε is drawn on the
    generator's device in float32, so the same seed gives the same noise whatever the latent's
    device and dtype. ``amount`` 0 returns a copy of ``latent`` and draws nothing (the
    generator's state is unchanged, so a schedule that is 0 on some frames stays reproducible).
    Raises :class:`ParameterError` when ``amount`` is negative.
    """
    if not amount >= 0:
        raise ParameterError(f"--latent_noise {amount}: use an amount of 0 or more (0 adds no noise)")
    if amount == 0:
        return latent.clone()
    noise = torch.randn(latent.shape, generator=generator, device=generator.device,
                        dtype=torch.float32)
    return latent + (amount * noise).to(device=latent.device, dtype=latent.dtype)
