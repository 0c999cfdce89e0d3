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

Fitting keys to a model and telling SD v1 from SD 2.x files live in ``ldm.checkpoint_keys``
(``fit_state_dict``, ``checkpoint_family_of_keys``, ``unet_params_of_keys``, re-exported here);
``checkpoint_family(path)`` answers the family for a file while reading as little of it as possible.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors

from ldm.checkpoint_keys import SD_V1, SD_V2, checkpoint_family_of_keys, fit_state_dict, unet_params_of_keys
from ldm.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["read_state_dict", "fit_state_dict", "checkpoint_family", "checkpoint_family_of_keys", "SD_V1", "SD_V2",
           "unet_params_of_keys", "RestrictedUnpickler", "PickledObject", "restricted_pickle"]

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


def _readable_checkpoint(path) -> tuple[Path, str]:
    """(the checkpoint file, its format) for a path that must name a readable file."""
    path = _existing_file(path)
    try:
        return path, _sniff_format(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror}): check its permissions") from None


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, by key, on the CPU, in the file's dtypes.

    path: a ``.safetensors`` file or a torch pickle (``{"state_dict": ...}`` or a bare state dict),
    told apart by content, not by name. Zip-format torch files are memory-mapped.
    Raises CheckpointError naming the file for a missing, unreadable, truncated or corrupt file or
    one without a state dict; UnsafeCheckpointError for a pickle that would run code.
    """
    path, kind = _readable_checkpoint(path)
    if kind == _SAFETENSORS:
        return _state_dict_of(_load_safetensors(path), path)
    if kind == _TORCH_ZIP:
        _check_zip(path)
    return _state_dict_of(_load_torch(path, mmap=kind == _TORCH_ZIP), path)


def _existing_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path, or download the "
                              f"weights there (see models/README)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory: pass the .ckpt or .safetensors file in it")
    return path


def checkpoint_family(path) -> str | None:
    """"sd-v1", "sd-v2" or None (unknown) for a checkpoint file, from its keys and shapes only.

    A safetensors file is answered from its header alone; a torch file through the same restricted,
    memory-mapped load as ``read_state_dict`` (the tensors' bytes are not read). See
    ``checkpoint_family_of_keys`` for the rules. Raises CheckpointError (UnsafeCheckpointError)
    as ``read_state_dict`` does for a file that cannot be read.
    """
    path, kind = _readable_checkpoint(path)
    if kind == _SAFETENSORS:
        try:
            with safe_open(path, framework="pt") as f:
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}): download it again") from None
        shapes = {k[len("state_dict."):] if k.startswith("state_dict.") else k: v for k, v in shapes.items()}
    else:
        shapes = {key: tuple(t.shape) for key, t in read_state_dict(path).items()}
    return checkpoint_family_of_keys(shapes)
