"""Load checkpoint files without running code from them (issue 12, D').

A `.pt` file is a pickle, and a pickle can name any importable callable (`os.system`, `exec`)
and have it called while it is read: `torch.load(..., weights_only=False)` on a checkpoint
someone handed you runs whatever it contains. Everything mmoe-ds reads from a checkpoint goes
through `safe_torch_load`: torch's weights-only unpickler (tensors, containers, numbers,
strings, dtypes) plus an allow-list of exactly the other types DeepSpeed 0.19.8 and our rank
state put into their files (found with `torch.serialization.get_unsafe_globals_in_checkpoint`
on real checkpoints, ZeRO 0/1/2 × fp32/bf16; the fp16 loss scaler from DeepSpeed's source):

- model files (`mp_rank_00_model_states.pt`, `layer_*_expert_*_…`): nothing beyond torch's own.
- optimizer files (`zero_pp_rank_*`, `bf16_zero_pp_rank_*`, `expp_rank_*`): `deepspeed_globals()`.
- our `rank{r}_state.pt` (loader position + RNG states): `RNG_STATE_GLOBALS` (numpy's RNG state
  holds a uint32 array).

Anything else is refused with `UnsafeCheckpointError`, which names the file and the global.
These lists are pinned by tests/test_safe_load.py, with a table of known pickle gadgets (eval,
exec, getattr, os.system, subprocess.Popen, functools.partial, nested loads, ...): an entry added
here must be argued for above and added there.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UnsafeCheckpointError

__all__ = ["UnsafeCheckpointError", "SafeLoadCheckpointEngine", "RNG_STATE_GLOBALS", "allowed_globals",
           "deepspeed_globals", "pickle_globals", "safe_torch_load"]



def _numpy_reconstruct() -> Callable:
    """numpy's array-unpickling function, wherever this numpy version keeps it."""
    return np.ndarray((0,), np.uint8).__reduce__()[0]  # numpy._core.multiarray._reconstruct on numpy 2


# numpy.random.get_state() is ('MT19937', uint32 array, pos, has_gauss, cached_gaussian): the array
# pickles as _reconstruct(ndarray, shape, dtype) + its bytes, the dtype as numpy.dtype('u4') whose
# state is then set on an object of class UInt32DType (numpy >= 1.25 has a class per dtype). Files
# written under numpy 1 name the function `numpy.core.multiarray._reconstruct`: the same function,
# allowed under both names.
RNG_STATE_GLOBALS: tuple = (_numpy_reconstruct(), (_numpy_reconstruct(), "numpy.core.multiarray._reconstruct"),
                            np.ndarray, np.dtype, type(np.dtype(np.uint32)))


def deepspeed_globals() -> tuple:
    """The non-tensor objects DeepSpeed 0.19.8 pickles into its optimizer files (imported on demand:
    `mmoe-ds export` reads model files only and works without DeepSpeed).

    - `LossScaler`: ZeRO 1/2 store the optimizer's loss scaler object (static scale 1.0 for fp32/bf16);
    - `DynamicLossScaler`: the same under fp16 with dynamic loss scaling;
    - `fragment_address`: ZeRO 1/2's `param_slice_mappings` (a (numel, start) named tuple per parameter);
    - `ZeroStageEnum`: the stage, stored as the enum in `zero_stage`.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, fragment_address, ZeroStageEnum)


def _pickle_bytes(path: str | os.PathLike) -> bytes:
    """The pickle of a `torch.save` file (its `data.pkl` record), or the file itself when it is no zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            return z.read(names[0]) if names else b""
    with open(path, "rb") as f:
        return f.read()


def pickle_globals(data: bytes) -> list[str]:
    """Every `module.name` the pickles in `data` would import, read statically (nothing is executed).

    Reads consecutive pickles (torch's legacy format writes several) until bytes that are not one."""
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str] = []
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # raw tensor bytes after the pickles, or a damaged pickle: what was read counts
            break
    return list(dict.fromkeys(found))


def _global_name(entry) -> str:
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


def allowed_globals(allowed: Sequence = ()) -> set[str]:
    """Every `module.name` a file read with `safe_torch_load(..., allowed=allowed)` may reference: torch's
    weights-only defaults, what has been registered process-wide with `torch.serialization.add_safe_globals`
    (torch registers a few of its own tensor types on import; mmoe-ds registers nothing) and `allowed`."""
    torch_defaults = getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)  # private in torch 2.13
    names = set(torch_defaults())
    names.update(_global_name(entry) for entry in torch.serialization.get_safe_globals())
    names.update(_global_name(entry) for entry in allowed)
    return names


def _refusal(path: str | os.PathLike, allowed: Sequence, error: pickle.UnpicklingError) -> UnsafeCheckpointError:
    try:
        names = [g for g in pickle_globals(_pickle_bytes(path)) if g not in allowed_globals(allowed)]
    except (OSError, zipfile.BadZipFile):
        names = []
    if names:
        what = (f"a pickle that references {', '.join(names)}, which {'is' if len(names) == 1 else 'are'} not on "
                "mmoe-ds's allow-list of checkpoint types; loading it would run code named by the file")
    else:
        reason = next((line.strip() for line in reversed(str(error).splitlines())
                       if line.strip() and not line.startswith("Check the documentation")), "")
        what = f"a pickle that torch's weights-only loader refuses ({reason}); loading it unchecked could run code"
    return UnsafeCheckpointError(
        f"{path}: refused to load: it contains {what}. "
        "Load only checkpoints you trust; if you trust this one, re-save it from its trusted source "
        "(the run that wrote it, same mmoe-ds and DeepSpeed versions).")


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu", allowed: Sequence = ()) -> Any:
    """`torch.load` with `weights_only=True`, allowing torch's own safe types plus `allowed`.

    Args:
        path: the file to read.
        map_location: as for `torch.load` (a device, a dict, or a callable).
        allowed: extra classes/functions the file may name (`RNG_STATE_GLOBALS`, `deepspeed_globals()`);
            an entry may be `(obj, "module.name")` to allow `obj` under another name.
    Returns: the loaded object.
    Raises: UnsafeCheckpointError naming the file and the refused global(s).
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, allowed, e) from None


class SafeLoadCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine so that every file `engine.load_checkpoint` reads goes
    through `safe_torch_load`; everything else (save, commit, ...) is the wrapped engine's.

    DeepSpeed reads model, expert and optimizer files only through `engine.checkpoint_engine.load`,
    so installing this one for the duration of `load_checkpoint` makes the whole load weights-only,
    reading each file once (no check-then-load window)."""

    def __init__(self, inner, allowed: Sequence):
        self.inner = inner
        self.allowed = tuple(allowed)

    def load(self, path, map_location=None):
        return safe_torch_load(path, map_location=map_location, allowed=self.allowed)

    def __getattr__(self, name):
        return getattr(self.inner, name)
