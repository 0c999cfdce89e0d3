"""Reading Stable Diffusion checkpoint files safely, and fitting their keys to a model.

Two formats exist in the wild:

* ``.safetensors``: a JSON header plus raw tensor bytes; read with ``safetensors`` (memory-mapped),
  nothing in it can run code.
* torch ``.ckpt``/``.pt``/``.pth``: a zip holding a pickle (``data.pkl``) plus one record per tensor
  storage (or, before torch 1.6, one long pickle stream). Unpickling runs whatever callables the
  pickle names, so ``torch.load(weights_only=False)`` on an untrusted file is arbitrary code
  execution. ``torch.load(weights_only=True)`` is safe but refuses real SD v1 files, which pickle
  PyTorch Lightning objects (e.g. ``callbacks: {ModelCheckpoint: {...}}``) beside the weights.

How the pickle is read here: ``torch.load`` does the zip/storage work (including ``mmap=True``, so
the tensors of a 4 GB file are views of the mapped file, never a second in-memory copy), but with
``pickle_module=`` set to a restricted module whose ``Unpickler.find_class`` decides about each global
the pickle names, from its module and name alone and before anything is called or imported:

* tensor/storage rebuild functions, ``torch.Size``/``device``/dtypes, ``OrderedDict`` and plain
  builtin containers and numbers are admitted (resolved from modules that are already imported);
* a global from a module that can run code or touch the system (``os``, ``subprocess``,
  ``builtins.exec``/``eval``/``getattr``, ``sys``, ``importlib``, ``pickle``, ``ctypes``, ...) raises
  ``UnsafeCheckpointError`` at once, so the pickle's call to it is never reached;
* any other global becomes an inert placeholder class that only records the arguments and state
  the pickle gives it (so Lightning's ``ModelCheckpoint`` entries load as placeholders and are
  dropped with everything else that is not in the state dict).

Only the state dict's tensors are returned; everything else the pickle held is discarded.
"""
import builtins
import codecs
import collections
import logging
import pickle
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch._tensor
import torch._utils
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from ldm.errors import CheckpointError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

# -------------------------------------------------------------------------------- restricted pickle

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
           torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)

_ADMITTED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): torch._utils._rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "UntypedStorage"): torch.UntypedStorage,
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
    ("_codecs", "encode"): codecs.encode,
    **{("torch", str(dtype).removeprefix("torch.")): dtype for dtype in _DTYPES},
    **{(module, name): getattr(builtins, name)
       for module in ("builtins", "__builtin__")
       for name in ("set", "frozenset", "dict", "list", "tuple", "complex", "slice", "bytearray",
                    "bytes", "int", "float", "str", "bool", "range")},
}

# Modules whose globals can run programs, load code, reach the network or the file system, or
# reach arbitrary attributes (operator.attrgetter, getattr, types.FunctionType...).
_UNSAFE_MODULES = frozenset("""
    os nt posix posixpath ntpath subprocess _posixsubprocess builtins __builtin__ sys shutil socket
    _socket ssl importlib imp zipimport pkgutil runpy pickle _pickle cPickle dill cloudpickle marshal
    code codeop ctypes _ctypes webbrowser pty multiprocessing _thread threading signal asyncio pdb bdb
    types functools operator _operator io _io tempfile glob pathlib urllib http ftplib smtplib
    telnetlib requests inspect gc platform commands popen2 timeit cProfile profile trace doctest
    """.split())


def _is_unsafe(module: str) -> bool:
    return module.split(".")[0] in _UNSAFE_MODULES


class PickledObject:
    """An inert stand-in for an object of a class the checkpoint names but we do not import.

    It records what the pickle passes (constructor args, ``__setstate__`` state, appended and
    set items) and calls nothing. ``pickled_global`` is the class's "module.name".
    """

    pickled_global = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.mapping = args, kwargs, None, [], {}
        return obj

    def __init__(self, *args, **kwargs):
        pass  # __new__ recorded everything (pickle's NEWOBJ calls __new__ without __init__)

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)

    def __setitem__(self, key, value):
        self.mapping[key] = value

    def __repr__(self):
        return f"<unloaded {self.pickled_global}>"


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose ``find_class`` admits, refuses or stubs each global (see module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._placeholders = {}

    def find_class(self, module, name):
        admitted = _ADMITTED.get((module, name))
        if admitted is not None:
            return admitted
        if _is_unsafe(module):
            raise UnsafeCheckpointError(
                f"its pickle asks to call {module}.{name}, which can run arbitrary code; "
                f"refused before anything ran")
        key = f"{module}.{name}"
        if key not in self._placeholders:
            self._placeholders[key] = type(name, (PickledObject,), {"pickled_global": key})
        return self._placeholders[key]


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load calls as ``pickle_module``: it subclasses ``Unpickler`` and, for pre-1.6 files,
# also calls ``load`` directly.
restricted_pickle = types.ModuleType("ldm.checkpoint.restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load

# ------------------------------------------------------------------------------------ file reading

_TORCH_ZIP, _TORCH_LEGACY, _SAFETENSORS = "torch zip", "legacy torch pickle", "safetensors"


def _sniff_format(path: Path) -> str:
    """Which format the file is, from its first bytes (names lie: some .ckpt files are safetensors)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty: download it again")
    if head.startswith(b"PK\x03\x04"):
        return _TORCH_ZIP
    if head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
        if 8 + int.from_bytes(head[:8], "little") > size:
            raise CheckpointError(f"checkpoint {path} is truncated (its safetensors header is cut off): "
                                  f"download it again")
        return _SAFETENSORS
    if head.startswith(b"\x80"):  # a pickle stream: torch's format before 1.6
        return _TORCH_LEGACY
    raise CheckpointError(f"{path} is neither a torch checkpoint nor a safetensors file: "
                          f"pass a Stable Diffusion .ckpt or .safetensors file")


def _check_zip(path: Path) -> None:
    """The zip's table of contents must be there (a truncated download loses it, at the end)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({exc}): download it again") from None
    if any(name.endswith("/constants.pkl") for name in names):
        raise CheckpointError(f"{path} is a TorchScript archive, not a checkpoint: pass a Stable Diffusion "
                              f".ckpt or .safetensors file")
    if not any(name.endswith("data.pkl") for name in names):
        raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (no data.pkl in it): "
                              f"pass a Stable Diffusion .ckpt or .safetensors file")


def _load_torch(path: Path, mmap: bool):
    try:
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False,
                          mmap=mmap)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(
            f"checkpoint {path} is unsafe: {exc}. Use a .safetensors copy of these weights instead") from None
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError,
            KeyError, IndexError, OSError, SafetensorError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}): download it again") from None


def _load_safetensors(path: Path) -> dict:
    try:
        return load_safetensors(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}): download it again") from None


def _state_dict_of(obj, path: Path) -> dict:
    """The tensors of ``obj["state_dict"]`` (Lightning/CompVis files) or of ``obj`` itself (bare)."""
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds no state dict (it holds a {type(obj).__name__}): "
                              f"pass a Stable Diffusion .ckpt or .safetensors file")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        found = ", ".join(map(str, list(state)[:5])) or "nothing"
        raise CheckpointError(f"checkpoint {path} holds no state dict (no tensors; its keys: {found}): "
                              f"pass a Stable Diffusion .ckpt or .safetensors file")
    if len(tensors) < len(state):
        logger.debug("%s: ignoring %d non-tensor entries of the state dict", path, len(state) - len(tensors))
    if isinstance(obj, Mapping) and "global_step" in obj:
        logger.debug("%s: global step %s", path, obj["global_step"])
    return tensors


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, by key, on the CPU, in the file's dtypes.

    path: a ``.safetensors`` file or a torch pickle (``{"state_dict": ...}`` or a bare state dict),
    told apart by content, not by name. Zip-format torch files are memory-mapped.
    Raises CheckpointError naming the file for a missing, unreadable, truncated or corrupt file or
    one without a state dict; UnsafeCheckpointError for a pickle that would run code.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path, or download the "
                              f"weights there (see models/README)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory: pass the .ckpt or .safetensors file in it")
    try:
        kind = _sniff_format(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror}): check its permissions") from None
    if kind == _SAFETENSORS:
        return _state_dict_of(_load_safetensors(path), path)
    if kind == _TORCH_ZIP:
        _check_zip(path)
    return _state_dict_of(_load_torch(path, mmap=kind == _TORCH_ZIP), path)


# ------------------------------------------------------------------------------------ key fitting

_TEXT_WITH = "cond_stage_model.transformer.text_model."
_TEXT_WITHOUT = "cond_stage_model.transformer."

# Model keys a file may lack: values the config determines (the noise schedule), a buffer recent
# transformers releases no longer keep, and the EMA counters.
_SCHEDULE_BUFFERS = frozenset("""betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod
    sqrt_one_minus_alphas_cumprod log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod
    sqrt_recipm1_alphas_cumprod posterior_variance posterior_log_variance_clipped posterior_mean_coef1
    posterior_mean_coef2""".split())
_EMA_COUNTERS = frozenset({"model_ema.decay", "model_ema.num_updates"})


def _may_be_absent(key: str) -> bool:
    return key in _SCHEDULE_BUFFERS or key in _EMA_COUNTERS or key.endswith("embeddings.position_ids")


def _text_key(key: str, model_has_text_model: bool) -> str:
    """``key`` in the text-tower layout the model uses (with or without ``text_model.``)."""
    if model_has_text_model and key.startswith(_TEXT_WITHOUT) and not key.startswith(_TEXT_WITH):
        return _TEXT_WITH + key[len(_TEXT_WITHOUT):]
    if not model_has_text_model and key.startswith(_TEXT_WITH):
        return _TEXT_WITHOUT + key[len(_TEXT_WITH):]
    return key


def _few(items, n=3) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def fit_state_dict(state_dict: dict, model_state: dict, ckpt_name: str, config_name: str = "the config") -> dict:
    """The checkpoint's tensors renamed and filtered to the model's keys, after strict checks.

    state_dict: from ``read_state_dict``; model_state: ``model.state_dict()`` (only keys and shapes
    are used). Text-tower keys are mapped to the model's layout; ``position_ids`` the model does not
    keep and, when the model has no EMA (``use_ema: False``), all ``model_ema.*`` entries are dropped.
    Raises CheckpointError naming both files when a model weight is missing or a tensor's shape
    differs; keys the model does not know are dropped with a warning. The tensors come back in the dtypes
    of ``model_state``.
    """
    model_has_text_model = any(k.startswith(_TEXT_WITH) for k in model_state)
    model_has_ema = any(k.startswith("model_ema.") for k in model_state)
    fitted, unexpected, ema_dropped = {}, [], 0
    for key, tensor in state_dict.items():
        key = _text_key(key, model_has_text_model)
        if key in model_state:
            fitted[key] = tensor
        elif key.startswith("model_ema.") and not model_has_ema:
            ema_dropped += 1
        elif not key.endswith("embeddings.position_ids"):
            unexpected.append(key)
    if ema_dropped:
        logger.debug("%s: ignoring %d model_ema entries (the config has use_ema: False)", ckpt_name, ema_dropped)

    missing = [k for k in model_state if k not in fitted and not _may_be_absent(k)]
    reshaped = [f"{k}: file {tuple(t.shape)} vs model {tuple(model_state[k].shape)}"
                for k, t in fitted.items() if t.shape != model_state[k].shape]
    if missing or reshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} weights missing ({_few(missing)})")
        if reshaped:
            problems.append(f"{len(reshaped)} of another shape ({_few(reshaped)})")
        raise CheckpointError(f"{ckpt_name} does not fit {config_name}: {', '.join(problems)}. "
                              f"Is this checkpoint for this config?")
    if unexpected:
        logger.warning("%s: %d tensors the model built from %s does not use, ignored (%s)",
                       ckpt_name, len(unexpected), config_name, _few(unexpected, 5))
    # in the model's dtypes, so that load_state_dict(assign=True) keeps them (float16 files)
    return {k: t.to(model_state[k].dtype).contiguous() for k, t in fitted.items()}
