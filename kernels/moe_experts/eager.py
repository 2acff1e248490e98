"""MoE experts over tokens already sorted by expert, in plain PyTorch: the reference of the
`moe.experts` op (kernels/moe_experts/triton.py, a grouped GEMM, is the fast one).

The op's boundary is the sorted token buffer, so expert parallelism (an all-to-all that
exchanges sorted tokens and their per-expert counts) can sit between the sort and the experts:

    experts(x_sorted_TH, tokens_per_expert_E, fc1_EFH, fc2_EHF, activation) -> y_sorted_TH

Rows `[start_e, start_e + tokens_per_expert[e])` (starts = exclusive cumsum of the counts) belong
to expert e and come out as `fc2[e] @ act(fc1[e] @ x)`.

Precision, shared by every implementation: the inputs are taken in one compute dtype, the
autocast dtype under autocast (as F.linear would), else the promoted dtype of x and the weights;
the output is in that dtype. Here the math then runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from megatron_hybrid.kernels.activations.eager import activation_fn, fc1_width

ACTIVATIONS = ("squared_relu", "swiglu")


def check_experts_args(
    x_sorted_TH: Tensor,
    tokens_per_expert_E: Tensor,
    fc1_EFH: Tensor,
    fc2_EHF: Tensor,
    activation: str,
    name: str = "moe.experts",
) -> None:
    """Validate moe.experts' arguments (every implementation shares them). Raises ValueError
    naming the argument, its shape and the expected one."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x_sorted_TH.dim() != 2:
        raise ValueError(
            f"{name}: x_sorted_TH has shape {tuple(x_sorted_TH.shape)}, expected (tokens, hidden)"
        )
    if fc2_EHF.dim() != 3:
        raise ValueError(
            f"{name}: fc2_EHF has shape {tuple(fc2_EHF.shape)}, expected "
            "(experts, hidden, ffn_hidden)"
        )
    num_experts, hidden, ffn = fc2_EHF.shape
    expected_fc1 = (num_experts, fc1_width(ffn, activation), hidden)
    if tuple(fc1_EFH.shape) != expected_fc1:
        raise ValueError(
            f"{name}: fc1_EFH has shape {tuple(fc1_EFH.shape)}, expected "
            f"{expected_fc1} for fc2_EHF {tuple(fc2_EHF.shape)} and {activation}"
        )
    if x_sorted_TH.shape[1] != hidden:
        raise ValueError(
            f"{name}: x_sorted_TH has {x_sorted_TH.shape[1]} channels, the "
            f"experts' hidden size is {hidden}"
        )
    if (
        tokens_per_expert_E.shape != (num_experts,)
        or tokens_per_expert_E.dtype.is_floating_point
        or tokens_per_expert_E.dtype.is_complex
    ):
        raise ValueError(
            f"{name}: tokens_per_expert_E must be an integer tensor of shape "
            f"({num_experts},), got {tokens_per_expert_E.dtype} "
            f"{tuple(tokens_per_expert_E.shape)}"
        )


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on for these tensors' device
    type, else the promoted dtype of the tensors."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def experts(
    x_sorted_TH: Tensor,
    tokens_per_expert_E: Tensor,
    fc1_EFH: Tensor,
    fc2_EHF: Tensor,
    activation: str,
) -> Tensor:
    """Every expert's MLP on its rows of the sorted tokens, as one pair of batched matmuls.

    Args:
        x_sorted_TH: (T, H) tokens sorted by expert.
        tokens_per_expert_E: (E,) integer counts, on any device; they must sum to at most T.
            Rows past their sum are not any expert's: their output (and gradient) is zero.
        fc1_EFH: (E, F', H), F' = 2F for swiglu ([gate; up], the first half silu'd), else F.
        fc2_EHF: (E, H, F).
        activation: "squared_relu" or "swiglu".

    Returns:
        y_sorted_TH (T, H) in the compute dtype (module docstring); differentiable in x and both
        weights.

    Raises:
        ValueError: arguments of the wrong shape or kind, or counts summing to more than T.

    The rows are packed into an (E, capacity, H) buffer, capacity being the largest count (one
    host sync), zero-padded; padding stays zero through both activations and is never read back.
    """
    check_experts_args(x_sorted_TH, tokens_per_expert_E, fc1_EFH, fc2_EHF, activation)
    dtype = compute_dtype(x_sorted_TH, fc1_EFH, fc2_EHF)
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    num_tokens, hidden = x_sorted_TH.shape
    num_experts = fc2_EHF.shape[0]
    device = x_sorted_TH.device

    counts = tokens_per_expert_E.to(device=device, dtype=torch.int64)
    ends = counts.cumsum(0)
    capacity, routed = torch.stack([counts.max(), ends[-1]]).tolist() if num_experts else (0, 0)
    if routed > num_tokens:
        raise ValueError(
            f"moe.experts: tokens_per_expert_E sums to {routed}, more than the "
            f"{num_tokens} rows of x_sorted_TH"
        )
    rows = torch.arange(routed, device=device)
    expert = torch.searchsorted(ends, rows, right=True)
    slot = rows - (ends - counts)[expert]

    with torch.autocast(device.type, enabled=False):
        x = x_sorted_TH[:routed].to(dtype).to(math_dtype)
        fc1 = fc1_EFH.to(dtype).to(math_dtype)
        fc2 = fc2_EHF.to(dtype).to(math_dtype)
        packed = x.new_zeros(num_experts, capacity, hidden)
        packed[expert, slot] = x
        hidden_ECF = activation_fn(activation)(torch.bmm(packed, fc1.transpose(1, 2)))
        out = torch.bmm(hidden_ECF, fc2.transpose(1, 2))[expert, slot].to(dtype)
    if routed == num_tokens:
        return out
    return torch.cat([out, out.new_zeros(num_tokens - routed, hidden)])
