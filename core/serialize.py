"""Saving and loading arrays and training checkpoints in the safetensors format.

A safetensors file is an 8-byte little-endian header length N, then N bytes of JSON describing each
tensor (dtype, shape, byte offsets) plus a `__metadata__` map of strings, then the raw tensor bytes.
Loading it parses JSON and copies bytes: unlike a pickle, nothing in the file is ever executed.
(https://github.com/huggingface/safetensors)

Three guarantees this module adds on top of the format:

- Atomic writes. `save` writes a temporary file in the target's directory, flushes and fsyncs it,
  renames it over the target with `os.replace` (atomic on POSIX and Windows) and fsyncs the directory,
  so a crash at any moment leaves either the old file or the new one, never half of either.
- Integrity. The format has no checksum, so a flipped bit in the tensor bytes would load silently.
  `save` stores a SHA-256 digest of every tensor's name, dtype, shape and bytes and of the metadata
  under the metadata key `t2i.sha256`; `load` recomputes it and refuses a file that does not match.
  (Files written by other tools carry no digest and load without this check.)
- Clear errors. A missing, truncated, corrupted or foreign file raises an error naming the file and
  the problem (`FileNotFoundError` or `SerializationError`, a `ValueError`).

On top of `save`/`load`, `save_checkpoint`/`load_checkpoint` store everything a training run needs to
continue as if it had never stopped: weights, optimizer state, LR schedule, EMA, step and RNG state.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping

import numpy as np
import safetensors
import safetensors.numpy

from . import random as _random

DIGEST_KEY = "t2i.sha256"
CHECKPOINT_FORMAT = "t2i.checkpoint.v1"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header (100 MB)
_DTYPES = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
           "float16", "float32", "float64", "complex64"}  # the NumPy dtypes safetensors can hold
_FILE_DTYPES = {"BOOL", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "F32", "F64", "C64"}  # their names


class SerializationError(ValueError):
    """A file that is not a valid safetensors file, or does not fit what it is loaded into."""


# --- plain tensor files -----------------------------------------------------------------------


def _is_torch(value):
    """Whether `value` is a torch.Tensor (duck-typed: torch is not imported), read as `Module.load_state_dict`
    reads one, with `.detach().cpu().numpy()`, so that torch weights can be saved directly."""
    return all(hasattr(value, a) for a in ("detach", "cpu", "numpy"))


def _type_name(value):
    """The type of `value` with its module (`torch.Tensor`, not `Tensor`), for error messages."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _as_array(value, name):
    """A C-contiguous, little-endian NumPy array of a Tensor / torch.Tensor / ndarray / NumPy scalar (never a view
    with odd strides: safetensors copies raw memory, so a transposed view would otherwise be written in storage
    order)."""
    from .tensor import Tensor

    if isinstance(value, Tensor):
        value = value.numpy()
    elif _is_torch(value):  # before the CuPy test: a CUDA torch.Tensor has __cuda_array_interface__ too
        try:
            value = value.detach().cpu().numpy()
        except TypeError as e:  # a dtype NumPy lacks (bfloat16, float8): torch's message names no tensor
            raise TypeError(f"save: {name!r} has dtype {getattr(value, 'dtype', '?')}, which NumPy cannot hold "
                            f"(convert it first, e.g. .float()): {e}") from None
    elif hasattr(value, "__cuda_array_interface__"):  # a CuPy array
        value = value.get()
    if not isinstance(value, (np.ndarray, np.generic)):
        raise TypeError(f"save: {name!r} must be a core Tensor, a torch.Tensor or a NumPy or CuPy array, "
                        f"got {_type_name(value)}")
    a = np.asarray(value)
    if a.dtype.name not in _DTYPES:
        raise TypeError(f"save: {name!r} has dtype {a.dtype}, which safetensors cannot hold "
                        f"(supported: {', '.join(sorted(_DTYPES))})")
    if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into a 1-d one)
        a = a.copy(order="C")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def _digest(arrays, metadata):
    """SHA-256 over every tensor (name, dtype, shape, bytes) in name order and every metadata item."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        h.update(json.dumps([name, a.dtype.name, list(a.shape), a.nbytes]).encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    for key in sorted(metadata):
        if key != DIGEST_KEY:
            h.update(json.dumps([key, metadata[key]]).encode())
    return h.hexdigest()


def save(path, tensors_or_state, metadata=None):
    """Write a dict name -> Tensor/ndarray to `path` as a safetensors file, atomically.

    `metadata` is an optional dict of strings stored in the header (read back with `load_metadata`).
    Non-contiguous arrays are saved by value. The write goes to a temporary file in the same directory
    that replaces `path` only once it is complete and on disk, so a crash never leaves a partial file.
    """
    path = os.fspath(path)
    if not isinstance(tensors_or_state, Mapping):
        hint = " (pass model.state_dict())" if hasattr(tensors_or_state, "state_dict") else ""
        raise TypeError(f"save: expected a dict of name -> Tensor/ndarray, got {type(tensors_or_state).__name__}{hint}")
    arrays = {}
    for name, value in tensors_or_state.items():
        if not isinstance(name, str):
            raise TypeError(f"save: tensor names must be str, got {name!r}")
        if name == "__metadata__":  # the header's metadata key: the file would hold it twice and never load
            raise ValueError(f"save: the tensor name {name!r} is reserved by the safetensors format")
        arrays[name] = _as_array(value, name)
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not (isinstance(k, str) and isinstance(v, str)):
            raise TypeError(f"save: metadata must map str to str, got {k!r}: {type(v).__name__}")
    for text in (*arrays, *metadata.keys(), *metadata.values()):
        try:
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate: JSON in UTF-8 cannot hold it
            raise ValueError(f"save: {text!r} in the tensor names or metadata is not valid Unicode") from None
    if DIGEST_KEY in metadata:
        raise ValueError(f"save: metadata key {DIGEST_KEY!r} is reserved for the file's checksum")
    metadata[DIGEST_KEY] = _digest(arrays, metadata)
    try:
        data = safetensors.numpy.save(arrays, metadata=metadata)
    except safetensors.SafetensorError as e:  # e.g. an unsupported dtype
        raise TypeError(f"save: cannot write {path}: {e}") from e
    _write_atomic(path, data)


def _write_atomic(path, data: bytes):
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, _mode_for(path))  # mkstemp makes the file private (0600); give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # the rename itself is durable only once the directory entry is flushed
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _mode_for(path):
    """The mode the file would have if opened normally: the old file's, else 0666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _read(path):
    """(arrays, metadata) of a safetensors file, with a clear error for every way it can be broken."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise SerializationError(f"{path}: not a safetensors file (only {len(data)} bytes; truncated or empty?)")
    n = int.from_bytes(data[:8], "little")
    if len(data) > 8 and data[8:9] != b"{":
        raise SerializationError(f"{path}: not a safetensors file (no JSON header after the 8-byte length)")
    if n > _MAX_HEADER:
        raise SerializationError(f"{path}: not a safetensors file (header length {n} is implausible)")
    if 8 + n > len(data):
        raise SerializationError(f"{path}: truncated (header needs {n} bytes, the file has {len(data) - 8} after the "
                                 "length prefix)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # (RecursionError: nesting too deep)
        raise SerializationError(f"{path}: corrupted header (invalid JSON: {e})") from None
    if not isinstance(header, dict):
        raise SerializationError(f"{path}: corrupted header (expected a JSON object)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise SerializationError(f"{path}: corrupted header (a tensor entry lacks valid data_offsets)") from None
    for k, v in header.items():  # safetensors.numpy fails with a bare KeyError on a dtype NumPy lacks (BF16, F8_*)
        dtype = v.get("dtype") if k != "__metadata__" and isinstance(v, dict) else None
        if isinstance(dtype, str) and dtype not in _FILE_DTYPES:
            raise SerializationError(f"{path}: tensor {k!r} has dtype {dtype}, which NumPy cannot hold (load it with "
                                     "safetensors.torch and convert it, e.g. to float32)")
    have = len(data) - 8 - n
    if end > have:
        raise SerializationError(f"{path}: truncated (tensors need {end} bytes of data, the file has {have})")
    try:
        arrays = safetensors.numpy.load(data)
    except safetensors.SafetensorError as e:
        raise SerializationError(f"{path}: corrupted ({e})") from None
    metadata = header.get("__metadata__") or {}
    digest = metadata.get(DIGEST_KEY)
    if digest is not None and digest != _digest(arrays, metadata):
        raise SerializationError(f"{path}: corrupted (checksum mismatch: the tensor bytes or header changed "
                                 "after the file was written)")
    return arrays, metadata


def load(path):
    """The tensors of a safetensors file as a dict name -> ndarray.

    NumPy arrays, not Tensors: a file holds data, not graph nodes, and arrays are what
    `Module.load_state_dict` copies from (wrap one with `core.tensor(a)` when you need a Tensor).
    The file is read whole (no memory map), so the arrays are writable and independent of the file,
    which may be overwritten afterwards.
    """
    return _read(path)[0]


def load_metadata(path):
    """The string metadata stored in a safetensors file's header (including its checksum)."""
    return _read(path)[1]


def load_with_metadata(path):
    """(tensors, metadata) of one read of the file: unlike `load` then `load_metadata`, both come from the same
    version of a file that another process may be replacing meanwhile."""
    return _read(path)


# --- training checkpoints ---------------------------------------------------------------------
#
# A checkpoint is one safetensors file. Weights are entries `model.<name>`. The state dicts of the
# optimizer, scheduler and EMA and the user's `extra` are nested dicts/lists of numbers and arrays:
# each array becomes an entry named by its path (`optim.state.3.exp_avg`) and leaves {"$tensor": name}
# in a JSON copy of the structure, stored in the metadata together with the step and the RNG state.


def _encode(obj, name, arrays):
    """A JSON-able copy of `obj`, with each array moved into `arrays[name...]`."""
    from .tensor import Tensor

    is_array = isinstance(obj, (Tensor, np.ndarray)) or hasattr(obj, "__cuda_array_interface__") or _is_torch(obj)
    if is_array or isinstance(obj, np.generic):  # a NumPy scalar keeps its dtype: stored as a 0-d array
        while name in arrays:  # two paths spelled alike (a key "3" next to a key 3): keep both
            name += "_"
        arrays[name] = _as_array(obj, name)
        return {"$tensor" if is_array else "$scalar": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{name}.{i}", arrays) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"$tuple": items}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, f"{name}.{k}", arrays) for k, v in obj.items()}
        # non-string keys (the optimizer's parameter indices) keep their type as [key, value] pairs
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"save_checkpoint: {name} has a key of type {type(k).__name__}; use str or int")
        return {"$items": [[k, _encode(v, f"{name}.{k}", arrays)] for k, v in obj.items()]}
    raise TypeError(f"save_checkpoint: {name} is a {_type_name(obj)}, which a checkpoint cannot hold "
                    "(use numbers, str, lists, dicts and arrays)")


def _decode(obj, arrays, path):
    """Invert `_encode`: rebuild the structure, taking arrays from the file's entries."""
    if isinstance(obj, list):
        return [_decode(v, arrays, path) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, v), = obj.items()
            if tag in ("$tensor", "$scalar"):
                if v not in arrays:
                    raise SerializationError(f"{path}: corrupted checkpoint (entry {v!r} is referenced but missing)")
                return arrays[v] if tag == "$tensor" else arrays[v][()]
            if tag == "$tuple":
                return tuple(_decode(x, arrays, path) for x in v)
            if tag == "$items":
                return {k: _decode(x, arrays, path) for k, x in v}
        return {k: _decode(v, arrays, path) for k, v in obj.items()}
    return obj


def save_checkpoint(path, model, optimizer=None, step=0, *, scheduler=None, ema=None, extra=None):
    """Save everything needed to resume training bitwise-exactly: the model's weights, the optimizer's
    state, the step, the LR schedule and EMA (if given), the default generator's RNG state, and `extra`
    (any JSON-like dict, arrays allowed). The write is atomic (see `save`)."""
    arrays = {f"model.{k}": _as_array(v, f"model.{k}") for k, v in model.state_dict().items()}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": json.dumps(int(step)),
        "rng": _random.default_generator.get_state(),
    }
    for key, prefix, obj in [("optimizer", "optim", optimizer), ("scheduler", "sched", scheduler),
                             ("ema", "ema", ema)]:
        if obj is not None:
            meta[key] = json.dumps(_encode(obj.state_dict(), prefix, arrays))
    if extra is not None:
        meta["extra"] = json.dumps(_encode(extra, "extra", arrays))
    save(path, arrays, metadata=meta)


def _rehearse(obj, state, model):
    """Load `state` into a deep copy of `obj`, so that whatever `obj.load_state_dict` would reject is found
    before anything is changed. The copy shares the model and its parameters: an optimizer or EMA refers to
    them and loading only reads them, so only the (small) rest is copied."""
    memo = {id(model): model}
    if hasattr(model, "parameters"):
        memo.update((id(p), p) for p in model.parameters())
    try:
        trial = copy.deepcopy(obj, memo)
    except (TypeError, copy.Error):  # it holds something that cannot be copied (a lock, a file): not rehearsed
        return
    trial.load_state_dict(state)


def load_checkpoint(path, model, optimizer=None, *, scheduler=None, ema=None):
    """Restore a checkpoint written by `save_checkpoint` into `model` (and the optimizer, scheduler and
    EMA if given) and restore the default generator's RNG state. Returns {"step": int, "extra": ...}.

    Every part is checked before anything is changed, so a checkpoint that does not fit leaves the model,
    optimizer, scheduler, EMA and RNG as they were: the model's keys and shapes (a mismatch names the file,
    the key and both shapes), the RNG state, and the other parts by loading each into a copy first.
    """
    path = os.fspath(path)
    arrays, meta = _read(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise SerializationError(f"{path}: not a t2i checkpoint (metadata 'format' is {meta.get('format')!r}, "
                                 f"expected {CHECKPOINT_FORMAT!r}); use core.serialize.load for plain tensor files")
    try:
        weights = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
        states = {key: _decode(json.loads(meta[key]), arrays, path) if key in meta else None
                  for key in ("optimizer", "scheduler", "ema", "extra")}
        step, rng = json.loads(meta["step"]), meta["rng"]
        _random.Generator().set_state(rng)  # a scratch generator: the default one is set last
    except (KeyError, json.JSONDecodeError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise SerializationError(f"{path}: corrupted checkpoint metadata ({type(e).__name__}: {e})") from None

    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise SerializationError(f"{path}: the checkpoint does not fit the model: missing keys {missing}, "
                                 f"unexpected keys {unexpected}")
    for k, v in own.items():
        if tuple(v.shape) != weights[k].shape:
            raise SerializationError(f"{path}: size mismatch for {k}: the file has shape {weights[k].shape}, "
                                     f"the model has shape {tuple(v.shape)}")
    weights = {k: weights[k] for k in own}  # the model's order (the file stores entries sorted)
    parts = [(what, obj, states[what]) for what, obj in [("optimizer", optimizer), ("scheduler", scheduler),
                                                          ("ema", ema)] if obj is not None]
    for what, obj, state in parts:
        if state is None:
            raise SerializationError(f"{path}: a {what} was given but the checkpoint holds no {what} state")
        try:
            _rehearse(obj, state, model)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise SerializationError(f"{path}: cannot load the {what} state: {e}") from e

    try:  # every part fits: only now is anything changed, the model first (it was checked, not rehearsed)
        model.load_state_dict(weights)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise SerializationError(f"{path}: cannot load the model state: {e}") from e
    for _, obj, state in parts:
        obj.load_state_dict(state)
    _random.default_generator.set_state(rng)
    return {"step": step, "extra": states["extra"]}
