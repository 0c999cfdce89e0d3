"""What happens to a video frame's latent besides img2img itself.

Before img2img (frames after the first), the previous frame's latent may be colour-matched to the
reference picture (``--color_coherence``), have its contrast scaled (``--contrast``) and get
fresh seeded noise (``--latent_noise``): :func:`prepare_previous`. During img2img, network bends
(``--bend``, and ``--rms_bend`` as an ``add`` of loudness x F) change the noised latent, the
latent before a chosen step, or the final latent: :func:`frame_bends` says which apply to a frame,
:func:`bend` applies them. Bends inside UNet blocks run through
:class:`sounddiffusion.bending_specs.BlockBender` hooks, whose amounts the loop sets per frame.

Everything random is seeded from (``--seed``, frame, what), so a resumed render redoes a frame
exactly; amounts are host floats from the plan, so nothing here reads values back from the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .bending import apply
from .bending_specs import BendSpec, step_index
from .coherence import adjust_contrast, latent_noise, match_colors
from .engine import Engine
from .frame_plan import Frame, FramePlan

_NOISE_STREAM = 0  # the stream of --latent_noise; bend i draws from stream i + 1


def stream_generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for frame ``index``'s random stream ``stream``, derived from ``seed``."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, index, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


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


def steps_of_frame(frame: Frame, steps: int, *, first: bool) -> int:
    """How many denoising steps the frame runs: all for txt2img (the first frame without an init
    picture, or strength 1), else ``int(strength * steps)`` as upstream."""
    return steps if first else min(steps, int(frame.strength * steps))


def frame_bends(plan: FramePlan, frame: Frame, loudness: float, n_steps: int, *, first: bool) -> FrameBends:
    """The bends of ``frame`` (``loudness``: its slice's RMS) sorted by place, in the order given,
    ``--rms_bend`` first. The first frame of a render has no noised latent: its latent bends wait."""
    bends = FrameBends()
    if not first:
        bends.noised.append(Bend("add", loudness * frame.rms_bend, 0))
    for number, (spec, amount) in enumerate(zip(plan.bends, frame.bend_amounts)):
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


def block_specs(plan: FramePlan) -> list[BendSpec]:
    """The plan's bends that act inside UNet blocks."""
    return [spec for spec in plan.bends if spec.is_block]


def prepare_previous(engine: Engine, previous: torch.Tensor, frame: Frame, reference: np.ndarray | None,
                     color_space: str, seed: int) -> torch.Tensor:
    """The previous latent (1, 4, h, w) as frame ``frame``'s img2img starts from it: colours
    matched to ``reference`` (H, W, 3 uint8) in ``color_space`` when the frame asks for it
    (decode, match, encode), contrast scaled, fresh noise added. Identity amounts change nothing."""
    if frame.match_colors and reference is not None and frame.color_coherence_strength > 0:
        picture = engine.decode(previous)[0]
        matched = match_colors(picture, reference, space=color_space, strength=frame.color_coherence_strength)
        previous = engine.encode_image(matched[None])
    if frame.contrast != 1:
        previous = adjust_contrast(previous, frame.contrast)
    if frame.latent_noise > 0:
        previous = latent_noise(previous, frame.latent_noise, stream_generator(seed, frame.index, _NOISE_STREAM))
    return previous
