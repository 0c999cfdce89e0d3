"""The model as the command lines use it: text conditionings, txt2img, img2img, encoding, decoding.

An :class:`Engine` is made by :func:`sounddiffusion.model.loading.load_engine`; every job samples through
its methods, so seeds, samplers (``--sampler``: DDIM, PLMS, LCM, Euler ancestral; what each runs:
:mod:`sounddiffusion.model.samplers`), the autoencoder (the checkpoint's, or TAESD with ``--vae``) and
precision handling live in one place.

Latents are ``(B, 4, H/8, W/8)`` tensors on the engine's device; conditionings are ``(B, 77, D)``
with ``D`` the model's context width (768 for SD v1); images leave as ``(B, H, W, 3)`` uint8 arrays.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sounddiffusion.errors import ParameterError
from sounddiffusion.model.samplers import FEW_STEP, check_strength, img2img_kind
from sounddiffusion.model.tiny_vae import TinyVae, check_can_encode

log = logging.getLogger(__name__)

LATENT_SCALE = 8  # the autoencoder's downsampling factor

LatentHook = Callable[[torch.Tensor], torch.Tensor]
StepHook = Callable[[int, torch.Tensor], torch.Tensor]


def _counted(hook: StepHook):
    """The samplers' ``before_step(x, t)`` for ``hook(i, x)``: i counts the steps of this call."""
    steps = itertools.count()
    return lambda x, t: hook(next(steps), x)


def _step_hook(before_step: StepHook | None, bend_noised: LatentHook | None):
    """A few-step sampler's ``before_step(x, t)`` that applies ``bend_noised`` to the noised
    latent (before step 0) and then ``before_step(i, x)``; None when both are None."""
    if before_step is None and bend_noised is None:
        return None
    steps = itertools.count()

    def hook(x, t):
        i = next(steps)
        if i == 0 and bend_noised is not None:
            x = bend_noised(x)
        return before_step(i, x) if before_step is not None else x
    return hook


def step_generator(seed: int | Sequence[int]) -> torch.Generator | list[torch.Generator]:
    """A CPU generator seeded with ``seed``: noise drawn from it is the same on every device.

    A list of seeds (one per row of a batch) gives one generator each: the samplers then draw
    row b's step noise from seed b alone, as a render of that row by itself does."""
    if not isinstance(seed, int) and isinstance(seed, Sequence):
        return [step_generator(one) for one in seed]
    return torch.Generator().manual_seed(int(seed) % 2**63)


@dataclass
class Engine:
    """A loaded model on a device, with the operations the entry points need.

    ``model`` is an ``ldm.models.diffusion.ddpm.LatentDiffusion`` in eval mode.
    ``checkpoint``/``checkpoint_hash`` identify the weights in saved parameters; ``loras`` the
    merged LoRA files as outputs record them (:func:`sounddiffusion.model.lora_specs.lora_record`),
    ``lora_patch`` their :class:`~sounddiffusion.model.lora.LoraPatch` (None without LoRAs). ``vae``:
    TAESD (on the engine's device and dtype) encoding and decoding pictures instead of the model's
    autoencoder, or None.
    """

    model: torch.nn.Module
    device: torch.device
    precision: str
    checkpoint: str
    checkpoint_hash: str
    loras: list[dict] = field(default_factory=list)
    lora_patch: object | None = field(default=None, repr=False)
    vae: TinyVae | None = None
    _text_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _samplers: dict[str, object] = field(default_factory=dict, repr=False)

    # -- LoRA weights

    def set_lora_weights(self, weights: Sequence[float]) -> None:
        """Merges the LoRA files at ``weights`` (one per ``--lora``, in order) for what is sampled next.

        Nothing happens when they are the weights already merged; otherwise only the weights the
        changed files touch are rewritten (:meth:`LoraPatch.set_weights`), and when those include the
        text encoder's, the prompts' conditionings are computed anew."""
        weights = tuple(float(w) for w in weights)
        if self.lora_patch is None or weights == self.lora_patch.weights:
            return
        rewritten = self.lora_patch.set_weights(weights)
        if any(name.startswith("cond_stage_model.") for name, _ in rewritten):
            self.text_encoder_changed()

    def text_encoder_changed(self) -> None:
        """Forgets the cached text conditionings after the text encoder's weights changed; the demo
        model measures its pictures against the empty prompt's conditioning, so that is taken anew."""
        self._text_cache.clear()
        unet = self.model.model.diffusion_model
        if hasattr(unet, "set_null_context"):  # ldm's DemoDenoiser
            unet.set_null_context(self.text_conditioning(""))

    @property
    def context_dim(self) -> int:
        """D, the width of the conditioning matrices (768 for SD v1)."""
        return self.text_conditioning("").shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def autocast(self):
        """Mixed precision for ``--precision autocast`` (as upstream), else a no-op context."""
        if self.precision != "autocast":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- conditioning

    @torch.inference_mode()
    def text_conditioning(self, prompt: str) -> torch.Tensor:
        """The (77, D) CLIP conditioning of ``prompt``, float32 on the device; computed once per prompt."""
        cached = self._text_cache.get(prompt)
        if cached is None:
            with self.autocast():
                cached = self.model.get_learned_conditioning([prompt])[0].float()
            self._text_cache[prompt] = cached
        return cached

    def _as_model_input(self, cond: torch.Tensor) -> torch.Tensor:
        cond = cond if cond.ndim == 3 else cond[None]
        return cond.to(self.device, self.dtype)

    # -- samplers

    @property
    def vae_hash(self) -> str | None:
        """The hash of ``--vae``'s TAESD weights (recorded with the results), None without one."""
        return self.vae.hash if self.vae is not None else None

    @property
    def embeds_guidance(self) -> bool:
        """Whether the UNet takes the guidance scale as an input (LCM-distilled, ``time_cond_proj_dim``)."""
        return getattr(self.model, "guidance_embedding_dim", None) is not None

    def sampler(self, kind: str):
        """The sampler ``kind`` (one of ``settings.SAMPLERS``) for this model, one instance each,
        reused across calls: DDIM, PLMS, LCM (``lcm``) or Euler ancestral (``euler_a``)."""
        if kind not in self._samplers:
            from ldm.models.diffusion.ddim import DDIMSampler
            from ldm.models.diffusion.euler_ancestral import EulerAncestralSampler
            from ldm.models.diffusion.lcm import LCMSampler
            from ldm.models.diffusion.plms import PLMSSampler

            classes = {"ddim": DDIMSampler, "plms": PLMSSampler, "lcm": LCMSampler, "euler_a": EulerAncestralSampler}
            if kind not in classes:
                raise ParameterError(f"sampler {kind!r}: use one of {', '.join(classes)}")
            if self.embeds_guidance and kind != "lcm":
                log.warning("this UNet is LCM-distilled (it embeds the guidance scale): it is made for "
                            "--sampler lcm, not %s", kind)
            self._samplers[kind] = classes[kind](self.model)
        return self._samplers[kind]

    def _ddpm_hook(self, kind: str, hook):
        """``hook(x, t)`` as the sampler ``kind`` calls it, seeing the latent on the DDPM scale as
        with DDIM: Euler ancestral's latent is that one times sqrt(sigma_t^2 + 1) = 1 / sqrt(a_t)."""
        if hook is None or kind != "euler_a":
            return hook
        alphas = self.model.alphas_cumprod

        def on_ddpm_scale(x, t):
            scale = alphas[t[:1]].rsqrt().reshape(1, 1, 1, 1).to(x.dtype)
            return hook(x / scale, t) * scale
        return on_ddpm_scale

    def noise(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """Standard normal noise drawn on the CPU from ``seed`` (same numbers on every device)."""
        return torch.randn(shape, generator=step_generator(seed)).to(self.device, self.dtype)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, 4, height // LATENT_SCALE, width // LATENT_SCALE)

    @torch.inference_mode()
    def txt2img(self, cond: torch.Tensor, *, x_T: torch.Tensor, sampler: str = "plms", steps: int = 50,
                scale: float = 7.5, eta: float = 0.0, uncond: torch.Tensor | None = None,
                seed: int | Sequence[int] = 0, verbose: bool = False,
                before_step: StepHook | None = None) -> torch.Tensor:
        """Sample latents ``(B, 4, h, w)`` from start noise ``x_T`` under conditioning ``cond`` (B, 77, D).

        ``uncond`` defaults to the empty prompt's conditioning (classifier-free guidance);
        ``seed`` seeds the noise DDIM adds at each step when ``eta`` > 0 (LCM and Euler ancestral:
        the fresh noise of every step but the last); B seeds: one per row (:func:`step_generator`);
        ``before_step(i, x) -> x`` sees the latent (on DDIM's scale whatever the sampler) before
        step i (0-based) of the ``steps``."""
        cond = self._as_model_input(cond)
        uncond = self._uncond(cond, uncond)
        x_T = x_T.to(self.device, self.dtype)
        chosen = self.sampler(sampler)
        with self.autocast():
            if sampler in FEW_STEP:
                hook = self._ddpm_hook(sampler, _step_hook(before_step, None))
                samples, _ = chosen.sample(S=steps, batch_size=cond.shape[0], shape=list(x_T.shape[1:]),
                                           conditioning=cond, x_T=x_T, verbose=verbose,
                                           unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                                           generator=step_generator(seed), before_step=hook)
                return samples
            if before_step is not None:
                # The same steps as sample(), through decode(), which takes a step hook.
                chosen.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
                return chosen.decode(x_T, cond, steps, unconditional_guidance_scale=scale,
                                     unconditional_conditioning=uncond, generator=step_generator(seed),
                                     verbose=verbose, before_step=_counted(before_step))
            samples, _ = chosen.sample(
                S=steps, batch_size=cond.shape[0], shape=list(x_T.shape[1:]), conditioning=cond,
                verbose=verbose, unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                eta=eta, x_T=x_T, generator=step_generator(seed))
        return samples

    @torch.inference_mode()
    def img2img(self, init_latent: torch.Tensor, cond: torch.Tensor, *, noise: torch.Tensor,
                strength: float, sampler: str = "plms", steps: int = 50, scale: float = 7.5,
                eta: float = 0.0, uncond: torch.Tensor | None = None, seed: int | Sequence[int] = 0,
                verbose: bool = False,
                bend_noised: LatentHook | None = None, before_step: StepHook | None = None) -> torch.Tensor:
        """Noise ``init_latent`` (B, 4, h, w) to ``strength`` and denoise it under ``cond``.

        As upstream, DDIM and PLMS run ``int(strength * steps)`` of the ``steps``; Euler ancestral
        the last ``int(strength * steps)`` of its trailing schedule; LCM all ``steps``, spread below
        the strength (:mod:`sounddiffusion.model.samplers`). Strength 0 returns the init latent,
        strength 1 is txt2img from ``noise``. ``bend_noised(z) -> z`` changes the noised latent
        before the first step (upstream's "network bending" by loudness); ``before_step(i, x) -> x``
        sees the latent before each step i of those that run. ``seed`` seeds the per-step noise
        (DDIM with ``eta`` > 0, LCM, Euler ancestral), or B seeds each row's. Raises ParameterError
        for a strength the few-step samplers cannot run with ``steps``
        (:func:`~sounddiffusion.model.samplers.check_strength`)."""
        kind = img2img_kind(sampler, steps, strength)
        if kind == "txt2img":
            x_T = bend_noised(noise) if bend_noised is not None else noise
            return self.txt2img(cond, x_T=x_T, sampler=sampler, steps=steps, scale=scale, eta=eta,
                                uncond=uncond, seed=seed, verbose=verbose, before_step=before_step)
        init_latent = init_latent.to(self.device, self.dtype)
        if kind == "keep":
            return init_latent
        check_strength(sampler, steps, strength)  # arithmetic only: the sampler builds its schedule once
        cond = self._as_model_input(cond)
        uncond = self._uncond(cond, uncond)
        chosen = self.sampler(sampler)
        noise = noise.to(self.device, self.dtype)
        with self.autocast():
            if sampler in FEW_STEP:
                hook = self._ddpm_hook(sampler, _step_hook(before_step, bend_noised))
                return chosen.img2img(init_latent, cond, S=steps, strength=strength, init_noise=noise,
                                      unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                                      generator=step_generator(seed), before_step=hook, verbose=verbose)
            t_enc = int(strength * steps)
            chosen.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
            t = torch.full((init_latent.shape[0],), t_enc, device=self.device, dtype=torch.long)
            z_enc = chosen.stochastic_encode(init_latent, t, noise=noise)
            if bend_noised is not None:
                z_enc = bend_noised(z_enc)
            return chosen.decode(z_enc, cond, t_enc, unconditional_guidance_scale=scale,
                                 unconditional_conditioning=uncond, generator=step_generator(seed),
                                 verbose=verbose, before_step=_counted(before_step) if before_step else None)

    def negative_conditioning(self, negative_prompt: str) -> torch.Tensor | None:
        """The (77, D) conditioning guidance pushes away from for ``negative_prompt``; None for ""
        (the samplers then use the empty prompt's, as without a negative prompt)."""
        return self.text_conditioning(negative_prompt) if negative_prompt else None

    def _uncond(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        if uncond is None:
            uncond = self.text_conditioning("")
        uncond = self._as_model_input(uncond)
        return uncond.expand(cond.shape[0], -1, -1)

    # -- pixels

    def check_can_encode(self, why: str) -> None:
        """Raises ModelError when the run's TAESD has no encoder and ``why`` needs pictures encoded."""
        check_can_encode(self.vae, why)

    @torch.inference_mode()
    def encode_image(self, images: np.ndarray, why: str = "encoding a picture") -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> latents (B, 4, H/8, W/8), the posterior mean scaled (or
        TAESD's encoding with ``--vae``). ``why`` names what needs it in the error a decoder-only
        TAESD raises (ModelError).

        The mean (not a sample) keeps img2img deterministic for a given seed."""
        self.check_can_encode(why)
        pixels = torch.tensor(images, device=self.device)  # a copy: inputs may be read-only
        pixels = pixels.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
        with self.autocast():
            if self.vae is not None:
                return self.vae.autoencoder.encode(pixels)
            posterior = self.model.encode_first_stage(pixels)
            return self.model.get_first_stage_encoding(posterior.mode())

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, 4, h, w) -> uint8 images (B, 8h, 8w, 3), by the model's autoencoder or TAESD."""
        latents = latents.to(self.device, self.dtype)
        with self.autocast():
            if self.vae is not None:
                pixels = self.vae.autoencoder.decode(latents)
            else:
                pixels = self.model.decode_first_stage(latents)
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()


def warn_negative_prompt_without_guidance(negative_prompt: str, scale: float) -> None:
    """One warning when a negative prompt is given but the guidance ``scale`` (the largest of a
    render's) is at most 1: classifier-free guidance, eps_u + scale * (eps_c - eps_u) with eps_u
    the negative prompt's prediction, pushes away from it only for scale > 1. At 1 the sampler
    makes no unconditional prediction at all (few-step samplers such as LCM run there)."""
    if negative_prompt and scale <= 1:
        effect = "has no effect" if scale == 1 else "is mixed into the picture instead of avoided"
        log.warning("--negative_prompt %r %s at --scale %g: guidance pushes away from it only at a scale above 1",
                    negative_prompt, effect, scale)
