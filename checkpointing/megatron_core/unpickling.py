"""Reading Megatron-LM's pickles without Megatron-LM.

A Megatron checkpoint pickles objects of Megatron's classes: its `args` Namespace holds enums
(`ModelType`, `AttnBackend`, ...) and dataclasses, older `.metadata` files hold
`MCoreMetadata`. Importing Megatron to read them is not an option (it is not installed, and
unpickling runs whatever a global names). `StandInUnpickler` resolves a short list of harmless
classes and functions (containers, Namespace, torch's tensor rebuilding, numpy arrays, DCP's
metadata classes) and gives every other global an inert stand-in class: its instances record
their constructor arguments and state, and nothing of the named module runs.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any

import torch

# (module, name) globals resolved to the real object: data containers and torch's / numpy's
# rebuilding functions, which construct tensors and arrays and call nothing else.
_SAFE_GLOBALS = {
    *(
        ("builtins", name)
        for name in ("set", "frozenset", "complex", "slice", "range", "bytearray", "bytes")
    ),
    ("collections", "OrderedDict"),
    ("copyreg", "_reconstructor"),
    ("argparse", "Namespace"),
    ("types", "SimpleNamespace"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath")),
    ("io", "BytesIO"),
    ("_io", "BytesIO"),
    ("signal", "Signals"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by name (TensorProperties)
    ("torch", "device"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    *(
        (f"numpy.{core}.multiarray", name)
        for core in ("core", "_core")  # numpy 1 and 2
        for name in ("_reconstruct", "scalar")
    ),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
# Modules whose *classes* (not functions) are data: DCP's metadata records, numpy's dtypes.
_DATA_CLASS_MODULES = ("torch.distributed.checkpoint", "torch.distributed._shard", "numpy.dtypes")


class StandIn:
    """An object of a class this process does not import; `stand_in_name` says which
    (`megatron.core.enums.ModelType`). Equal to another stand-in of the same class and state."""

    stand_in_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stand_in_args = args
        self.stand_in_kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) of a slotted class
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.stand_in_state = state

    def __repr__(self) -> str:
        shown = ", ".join(map(repr, self.__dict__.get("stand_in_args", ())))
        return f"<{self.stand_in_name}({shown})>"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    __hash__ = object.__hash__


_stand_ins: dict[tuple[str, str], type] = {}


def stand_in_class(module: str, name: str) -> type:
    """The one stand-in class for global `module.name`."""
    key = (module, name)
    if key not in _stand_ins:
        _stand_ins[key] = types.new_class(
            name.rpartition(".")[2] or "StandIn",
            (StandIn,),
            exec_body=lambda ns: ns.update(stand_in_name=f"{module}.{name}"),
        )
    return _stand_ins[key]


def _is_torch_constant(value: object) -> bool:
    return isinstance(value, (torch.dtype, torch.layout, torch.memory_format))


class StandInUnpickler(pickle.Unpickler):
    """pickle.Unpickler resolving only harmless globals; any other gets a stand-in class."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and _is_torch_constant(getattr(torch, name, None)):
            return getattr(torch, name)  # torch.float32, torch.strided, ...
        if module.startswith(_DATA_CLASS_MODULES):
            try:
                found = super().find_class(module, name)
            except (ImportError, AttributeError):
                found = None
            if isinstance(found, type):
                return found
        return stand_in_class(module, name)


class _PickleModule(types.ModuleType):
    """What torch.load expects of `pickle_module`: an Unpickler class (and `load`)."""

    Unpickler = StandInUnpickler

    @staticmethod
    def load(file, **kwargs):
        return StandInUnpickler(file, **kwargs).load()


stand_in_pickle = _PickleModule("stand_in_pickle")


def load_pickle(data: bytes | io.BufferedIOBase) -> Any:
    """A plain pickle (DCP's `.metadata`)."""
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    return StandInUnpickler(file).load()


def load_torch(data: bytes) -> Any:
    """A `torch.save` payload (Megatron's `common.pt`, its ShardedObjects), tensors on CPU."""
    return torch.load(
        io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=stand_in_pickle
    )
