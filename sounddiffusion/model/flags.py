"""The flags of the model and of sampling that every entry point shares, as data
(:class:`~sounddiffusion.flags.FlagGroup`; ``sounddiffusion.cli`` makes them argparse options)."""
from __future__ import annotations

from sounddiffusion.flags import SCHEDULE_HELP, Flag, FlagGroup
from sounddiffusion.settings import (CHECKPOINT_DIR, DEFAULT_CONFIG, DEFAULT_SIZE, DEMO_SIZE, DEVICES, PRECISIONS,
                                     SAMPLERS, V2_CHECKPOINT_DIR, V2_CONFIG, V2_V_CONFIG, shown_path)


def model_flags(*, lora_schedules: bool = False) -> FlagGroup:
    """--config --ckpt --vae --demo --device --precision --compile --cuda_graphs --lora; with
    ``lora_schedules`` (audio2video) a LoRA's weight may be a schedule."""
    lora_help = ("merge a LoRA file (.safetensors, or .pt/.ckpt read without running code) into the model, "
                 "repeatable; WEIGHT (default 1.0, negative allowed) follows the colon after the path "
                 "(C:\\loras\\style.safetensors:0.8 works)"
                 + ("; a number or a schedule over the music, e.g. style.safetensors:\"0.2 + 0.8*low\""
                    if lora_schedules else "")
                 + " (README: LoRA files and negative prompts)")
    return FlagGroup("model", (
        Flag(("--config",), f"model config (CompVis YAML format); default: picked from the checkpoint's keys: "
                            f"{shown_path(DEFAULT_CONFIG)} for SD v1, {shown_path(V2_CONFIG)} for SD 2.x "
                            f"({V2_V_CONFIG.name} when the file name contains 768)"),
        Flag(("--ckpt",), f"checkpoint (.ckpt or .safetensors); default: model.ckpt or model.safetensors in "
                          f"{shown_path(CHECKPOINT_DIR)}/, else the one file in {shown_path(V2_CHECKPOINT_DIR)}/"),
        Flag(("--vae",), "encode and decode pictures with the tiny autoencoder TAESD (a folder or file from "
                         "madebyollin/taesd, which you download) instead of the checkpoint's: faster frames and "
                         "previews, slightly softer pictures (README: Fast sampling)", metavar="taesd:PATH"),
        Flag(("--demo",), "use the small built-in demo model (hand-designed, abstract pictures that follow the "
                          "sound; README: The demo model) to try the tools without downloading a checkpoint",
             default=False, action="store_true"),
        Flag(("--device",), "where to run: auto picks CUDA, then Apple MPS, then CPU", default="auto",
             choices=DEVICES),
        Flag(("--precision",), "auto: fp16 on CUDA, float32 elsewhere; full: float32; autocast: mixed precision "
                               "as upstream; fp16/bf16: half-precision weights", default="auto", choices=PRECISIONS),
        Flag(("--compile",), "compile the UNet with torch.compile: faster steps once the first one has compiled "
                             "it (minutes; on a CPU it needs a C++ compiler); pays off for videos",
             default=False, action="store_true"),
        Flag(("--cuda_graphs",), "CUDA only: replay each UNet call from a captured CUDA graph (one per picture "
                                 "size) instead of launching its kernels one by one; experimental, off by default",
             default=False, action="store_true"),
        Flag(("--lora",), lora_help, default=[], action="append", metavar="PATH[:WEIGHT]"),
    ))


def sampling_flags(*, plms_flag: bool = True, scheduled: bool = False, default_sampler: str = "ddim",
                   prompt_file: bool = False) -> FlagGroup:
    """--sampler (--plms) --ddim_steps --ddim_eta --scale --negative_prompt --seed --H --W --C --f;
    ``scheduled``: --scale takes a schedule (audio2video, live.py); ``default_sampler``: the entry
    point's; ``prompt_file``: the entry point has --prompt_file, whose lines may carry negatives."""
    size = f"(default {DEFAULT_SIZE}, {DEMO_SIZE} with --demo)"
    return FlagGroup("sampling", (
        Flag(("--sampler",), f"default {default_sampler}; lcm: LCM models and LCM-LoRA, 2-8 steps at --scale 1-2; "
                             f"euler_a: SD-Turbo, 1-4 steps at --scale 0 (README: Fast sampling)", choices=SAMPLERS),
        *((Flag(("--plms",), "use the PLMS sampler (= --sampler plms)", default=False, action="store_true"),)
          if plms_flag else ()),
        Flag(("--ddim_steps",), "number of denoising steps", default=50, type=int),
        Flag(("--ddim_eta",), "DDIM eta (0 = deterministic DDIM; PLMS needs 0)", default=0.0, type=float),
        Flag(("--scale",), "classifier-free guidance scale: how strongly the conditioning steers"
                           + (SCHEDULE_HELP if scheduled else ""),
             default="7.5" if scheduled else 7.5, type=str if scheduled else float),
        Flag(("--negative_prompt",), "what the picture should not look like: guidance pushes away from TEXT instead "
                                     "of from the empty prompt (needs --scale above 1)"
                                     + ("; a --prompt_file line 'TIME prompt --neg negative' has its own"
                                        if prompt_file else ""), default="", metavar="TEXT"),
        Flag(("--seed",), "random seed: same seed, same result", default=42, type=int),
        Flag(("--H",), f"image height in pixels {size}", type=int),
        Flag(("--W",), f"image width in pixels {size}", type=int),
        Flag(("--C",), "latent channels", default=4, type=int),
        Flag(("--f",), "downsampling factor of the autoencoder", default=8, type=int),
    ))
