"""The language-model loss: output projection + cross-entropy, in plain PyTorch (the reference).

    loss = mean over tokens n with labels[n] != ignore_index of
           logsumexp(logits[n]) - logits[n, labels[n]],    logits = hidden @ weight^T

This is what the model and trainer compute today (`F.linear` then `F.cross_entropy` of the
float32 logits), in one function, so that a fused implementation
(kernels/linear_cross_entropy/triton.py) can replace it. It materializes the whole (N, V) logits
and their float32 copy; at vocabulary 131072 that is 0.5 MiB of float32 per token.

Why the mean and not a per-token loss: the fused implementation computes the gradients during the
forward pass, which works only when the gradient of the loss with respect to every logit is known
then, i.e. for a scalar loss; the trainer averages over the tokens that are not ignored
(`F.cross_entropy`'s default), so that is the op's reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.kernels.dtypes import at_least_float32


def check_linear_cross_entropy_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    name: str = "linear_cross_entropy",
) -> None:
    """Raise ValueError unless hidden is (..., H), weight (V, H) and labels an integer tensor of
    hidden's leading shape. Every implementation shares this check."""
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: hidden has shape {tuple(hidden.shape)} and weight {tuple(weight.shape)}; "
            "expected hidden (..., H) with at least one leading dim and weight (vocab, H) with "
            "the same H"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{name}: labels have shape {tuple(labels.shape)}, expected hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels are {labels.dtype}, expected an integer dtype")


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight^T` against `labels` over the tokens whose label is
    not `ignore_index`: a float32 scalar (NaN when every token is ignored, as F.cross_entropy).

    Args:
        hidden: (..., H) final hidden states (the output layer's input).
        weight: (V, H) output-layer weight (the embedding weight when they are tied).
        labels: hidden's leading shape, integers in [0, V) or `ignore_index`.

    The logits are computed as the model's output layer computes them (`F.linear`, so under
    autocast in the autocast dtype) and the cross-entropy in float32 (float64 stays float64).
    """
    check_linear_cross_entropy_args(hidden, weight, labels)
    logits = at_least_float32(F.linear(hidden, weight))
    return F.cross_entropy(
        logits.reshape(-1, weight.shape[0]), labels.reshape(-1), ignore_index=ignore_index
    )
