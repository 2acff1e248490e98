"""Helpers shared by the Triton kernel launchers: 2-D row views and input checks."""

from __future__ import annotations

import os

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rows_view(t: Tensor) -> Tensor:
    """`t` as (rows, last dim) with unit stride along the last dim; a copy only when the
    leading dims do not merge or the last dim is strided."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def check_inputs(
    name: str, *, dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES, **tensors: Tensor
) -> None:
    """Raise ValueError for a dtype the kernels do not handle (not in `dtypes`), or tensors they
    cannot reach (CPU tensors outside Triton's interpreter, e.g. a model bound for CUDA run on
    CPU)."""
    for tensor_name, tensor in tensors.items():
        if tensor.dtype not in dtypes:
            raise ValueError(
                f"{name} (triton): {tensor_name} is {tensor.dtype}; supported: "
                f"{', '.join(map(str, dtypes))} (use the eager kernel for others)"
            )
        if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"{name} (triton): {tensor_name} is on {tensor.device}; Triton kernels need CUDA "
                "tensors, or TRITON_INTERPRET=1 for CPU tensors: bind eager kernels for a model "
                "that runs on CPU"
            )
