"""Fitting a checkpoint's keys to a model, and telling checkpoint families apart by their keys.

Only names and shapes are looked at here (reading files is ``ldm.checkpoint``'s job).

Families (what ``checkpoint_family_of_keys`` answers):

* ``"sd-v1"``: CLIP ViT-L/14 text tower under ``cond_stage_model.transformer.*``, 768-wide context;
* ``"sd-v2"``: OpenCLIP ViT-H/14 text tower under ``cond_stage_model.model.*``, 1024-wide context
  (512 base and 768-v files share the layout: v-prediction cannot be read from the keys);
* ``None``: anything else (inpainting and depth UNets with other input channels, diffusers
  layouts, other models).

What a file's keys say about its UNet beyond the family (``unet_params_of_keys``): LCM-distilled
UNets (LCM Dreamshaper...) carry a guidance-scale projection. Checkpoints converted from diffusers
keep diffusers' name for it, ``model.diffusion_model.time_embedding.cond_proj.weight`` (diffusers'
convert_diffusers_to_original_stable_diffusion maps no CompVis name onto it; stable-diffusion.cpp
meets it under that name), so ``UNetModel`` names its layer that way too.
"""
import logging
from collections.abc import Mapping

from ldm.errors import CheckpointError

logger = logging.getLogger(__name__)

SD_V1, SD_V2 = "sd-v1", "sd-v2"
_V1_TEXT = "cond_stage_model.transformer."
_V2_TEXT = "cond_stage_model.model.transformer.resblocks."
_UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
GUIDANCE_PROJECTION = "model.diffusion_model.time_embedding.cond_proj.weight"
_CONTEXT_WIDTHS = {768: SD_V1, 1024: SD_V2}

_TEXT_WITH = "cond_stage_model.transformer.text_model."
_TEXT_WITHOUT = "cond_stage_model.transformer."

# Model keys a file may lack: values the config determines (the noise schedule), a buffer recent
# transformers releases no longer keep, and the EMA counters.
_SCHEDULE_BUFFERS = frozenset("""betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod
    sqrt_one_minus_alphas_cumprod log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod
    sqrt_recipm1_alphas_cumprod posterior_variance posterior_log_variance_clipped posterior_mean_coef1
    posterior_mean_coef2""".split())
_EMA_COUNTERS = frozenset({"model_ema.decay", "model_ema.num_updates"})
# File keys no model here uses, dropped without a warning: v1's position ids, OpenCLIP's causal
# mask and image tower (SD 2.x files made from a whole OpenCLIP model).
_IGNORED_SUFFIXES = ("embeddings.position_ids", "cond_stage_model.model.attn_mask")
_IGNORED_PREFIXES = ("cond_stage_model.model.visual.",)
# Transformer projections: 1x1 convolutions (SD v1) or linear layers (SD 2.x), same numbers.
_PROJECTIONS = (".proj_in.weight", ".proj_out.weight")


def checkpoint_family_of_keys(keys_and_shapes: Mapping) -> str | None:
    """"sd-v1", "sd-v2" or None for a state dict's {key: shape} (shape: a tuple, list or torch.Size).

    The text tower's layout decides; without one, the width of the UNet's cross-attention context
    (``attn2.to_k.weight``: 768 or 1024 columns). A UNet taking other than 4 input channels
    (inpainting, depth) is None: the txt2img configs do not fit it.
    """
    unet_input = keys_and_shapes.get(_UNET_INPUT)
    if unet_input is not None and len(unet_input) > 1 and int(unet_input[1]) != 4:
        return None
    if any(k.startswith(_V2_TEXT) for k in keys_and_shapes):
        return SD_V2
    if any(k.startswith(_V1_TEXT) for k in keys_and_shapes):
        return SD_V1
    for key, shape in keys_and_shapes.items():
        if key.startswith("model.diffusion_model.") and key.endswith(".attn2.to_k.weight") and len(shape) == 2:
            return _CONTEXT_WIDTHS.get(int(shape[1]))
    return None


def unet_params_of_keys(keys_and_shapes: Mapping) -> dict:
    """The UNet config params a state dict's {key: shape} implies beyond a plain SD config:
    ``{"time_cond_proj_dim": n}`` when it holds a guidance projection of shape (model_channels, n)
    (an LCM-distilled UNet), else {}."""
    shape = keys_and_shapes.get(GUIDANCE_PROJECTION)
    if shape is None or len(shape) != 2:
        return {}
    return {"time_cond_proj_dim": int(shape[1])}


def _may_be_absent(key: str) -> bool:
    return key in _SCHEDULE_BUFFERS or key in _EMA_COUNTERS or key.endswith("embeddings.position_ids")


def _ignored(key: str) -> bool:
    return key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES)


def _text_key(key: str, model_has_text_model: bool) -> str:
    """``key`` in the text-tower layout the model uses (with or without ``text_model.``)."""
    if model_has_text_model and key.startswith(_TEXT_WITHOUT) and not key.startswith(_TEXT_WITH):
        return _TEXT_WITH + key[len(_TEXT_WITHOUT):]
    if not model_has_text_model and key.startswith(_TEXT_WITH):
        return _TEXT_WITHOUT + key[len(_TEXT_WITH):]
    return key


def _projection_as(key: str, tensor, shape):
    """A transformer projection stored as a 1x1 convolution (C_out, C_in, 1, 1) for a linear layer
    (C_out, C_in), or the other way round, reshaped to ``shape``; any other tensor unchanged."""
    if key.endswith(_PROJECTIONS) and tuple(tensor.shape) != tuple(shape) and tensor.numel() == shape.numel() \
            and tuple(tensor.shape[:2]) == tuple(shape[:2]) and all(d == 1 for d in (*tensor.shape[2:], *shape[2:])):
        return tensor.reshape(shape)
    return tensor


def _few(items, n=3) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _shape_example(reshaped: list, fitted: dict, model_state: dict) -> str:
    """The most telling of the ``reshaped`` keys in a few words: the cross-attention context width
    when it differs ("the context width, file 768 vs model 1024"), else the first key's shapes."""
    for key in reshaped:
        file_shape, model_shape = fitted[key].shape, model_state[key].shape
        if key.endswith(".attn2.to_k.weight") and len(file_shape) == 2 and file_shape[1] != model_shape[1]:
            return f"the context width, file {file_shape[1]} vs model {model_shape[1]}"
    key = reshaped[0]
    return f"{key}: file {tuple(fitted[key].shape)} vs model {tuple(model_state[key].shape)}"


def _family_hint(state_dict: dict, model_state: dict) -> str:
    """' (the file is SD 2.x, the config builds SD v1)' when the families differ, else ''."""
    names = {SD_V1: "SD v1", SD_V2: "SD 2.x"}
    ours = checkpoint_family_of_keys({k: t.shape for k, t in state_dict.items()})
    theirs = checkpoint_family_of_keys({k: t.shape for k, t in model_state.items()})
    if ours and theirs and ours != theirs:
        return f" (the file is {names[ours]}, the config builds {names[theirs]})"
    return ""


def fit_state_dict(state_dict: dict, model_state: dict, ckpt_name: str, config_name: str = "the config") -> dict:
    """The checkpoint's tensors renamed and filtered to the model's keys, after strict checks.

    state_dict: from ``read_state_dict``; model_state: ``model.state_dict()`` (only keys, shapes
    and dtypes are used). Text-tower keys are mapped to the model's layout; transformer projections
    stored as 1x1 convolutions fit linear ones and back; ``position_ids`` the model does not keep,
    OpenCLIP's ``attn_mask`` and image tower and, when the model has no EMA (``use_ema: False``),
    all ``model_ema.*`` entries are dropped.
    Raises CheckpointError naming both files (and both families when they differ) when a model
    weight is missing or a tensor's shape differs, in one line with the counts and one example
    (every key is logged at debug level); keys the model does not know are dropped with a
    warning. The tensors come back in the dtypes of ``model_state``.
    """
    model_has_text_model = any(k.startswith(_TEXT_WITH) for k in model_state)
    model_has_ema = any(k.startswith("model_ema.") for k in model_state)
    fitted, unexpected, ema_dropped = {}, [], 0
    for key, tensor in state_dict.items():
        key = _text_key(key, model_has_text_model)
        if key in model_state:
            fitted[key] = _projection_as(key, tensor, model_state[key].shape)
        elif key.startswith("model_ema.") and not model_has_ema:
            ema_dropped += 1
        elif not _ignored(key):
            unexpected.append(key)
    if ema_dropped:
        logger.debug("%s: ignoring %d model_ema entries (the config has use_ema: False)", ckpt_name, ema_dropped)

    missing = [k for k in model_state if k not in fitted and not _may_be_absent(k)]
    reshaped = [k for k, t in fitted.items() if t.shape != model_state[k].shape]
    if missing or reshaped:
        # One line for the user; every key for --debug.
        if missing:
            logger.debug("%s: %d weights of %s missing: %s", ckpt_name, len(missing), config_name, ", ".join(missing))
        for k in reshaped:
            logger.debug("%s: %s: file %s vs model %s", ckpt_name, k, tuple(fitted[k].shape),
                         tuple(model_state[k].shape))
        problems = [f"{len(missing)} weight{'s' if len(missing) != 1 else ''} missing"] if missing else []
        if missing and not reshaped:  # which part is missing (e.g. model_ema.*) is the telling fact
            problems[0] += f" such as {missing[0]}"
        if reshaped:
            problems.append(f"{len(reshaped)} of another shape such as "
                            f"{_shape_example(reshaped, fitted, model_state)}")
        raise CheckpointError(f"{ckpt_name} does not fit {config_name}{_family_hint(state_dict, model_state)}: "
                              f"{', '.join(problems)}; pass the config made for this checkpoint with --config "
                              f"(--debug lists every weight)")
    if unexpected:
        logger.warning("%s: %d tensors the model built from %s does not use, ignored (%s)",
                       ckpt_name, len(unexpected), config_name, _few(unexpected, 5))
    # in the model's dtypes, so that load_state_dict(assign=True) keeps them (float16 files)
    return {k: t.to(model_state[k].dtype).contiguous() for k, t in fitted.items()}
