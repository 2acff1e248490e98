"""Multi-token prediction (MTP): the pattern's '/' parts, as Megatron-Core's
MultiTokenPredictionBlock runs them in its HybridModel (DeepSeek-V3's scheme).

Each '/' part is one *depth*. Depth k (k = 1 .. D) reads the previous depth's output h^{k-1}
(h^0: the main decoder's output, after its final norm) and the shared embedding of the tokens
shifted by k, and at position i predicts token t_{i+k+1}:

    x^k   = eh_proj(cat(enorm(embed(t_{i+k})), hnorm(h^{k-1}_i)))   embedding first (Megatron's
                                                                     order; DeepSeek-V3 writes
                                                                     the hidden state first)
    h^k   = final_layernorm(the MTP part's blocks (x^k))             its blocks end in no norm
    L_k   = mean over i < T - k of CE(output_layer(h^k_i), t_{i+k+1})   (the shared output
                                                                     layer; the embedding when
                                                                     tied)

with labels_i = t_{i+1}. Megatron-Core shifts the token ids left with `roll_tensor`, which fills
the last k positions of depth k with token 0 and masks their loss; the same values are taken
here from the labels (the last pipeline stage's only tokens): positions without a target embed
token 0 and are ignored in the mean, as there. The loss of a training step is

    L = L_main + mtp_loss_scaling_factor * mean_k L_k

of which the model reports L_main (logged, evaluated, comparable with runs without MTP); the MTP
term joins L_main's gradient, scaled as L_main's gradient is (`_JoinGradient`, Megatron-Core's
MTPLossAutoScaler). MTP runs in training only: evaluation and generation use the main head.

Checkpoint keys are Megatron-Core's (canonical): `mtp.layers.{d}.enorm.weight`,
`.hnorm.weight`, `.eh_proj.weight`, `.final_layernorm.weight` (d = k - 1), and the MTP part's
sub-layers under `mtp.layers.{d}.mtp_model_layer.layers.{j}`, j counted from 0 within the depth
(megatron_hybrid/canonical.py), so a fused MTP part loads an unfused one's checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.kernels.registry import BoundKernels
from megatron_hybrid.layers.norm import RMSNorm
from megatron_hybrid.specs.base import InitRule
from megatron_hybrid.specs.init_rules import normal, ones

# The initialization of each depth's own tensors, by their name inside the depth (Megatron-Core:
# norms at one, eh_proj from its init_method, N(0, init_method_std)). Its blocks' tensors follow
# their specs, as in the main decoder (megatron_hybrid/init.py).
DEPTH_RULES: dict[str, InitRule] = {
    "enorm.weight": ones,
    "hnorm.weight": ones,
    "eh_proj.weight": normal,
    "final_layernorm.weight": ones,
}

# The token id at positions whose shifted token lies beyond the sequence (Megatron-Core's
# roll_tensor fills zeros), and the label the loss ignores there (the kernels' ignore_index).
FILL_TOKEN = 0
IGNORE_INDEX = -100


def depth_tokens_and_targets(labels_BT: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) of depth k from the next-token labels (labels[:, i] = t_{i+1}):
    tokens[:, i] = t_{i+k} and targets[:, i] = t_{i+k+1} for i < T - k; the last k positions
    hold FILL_TOKEN and IGNORE_INDEX."""
    seq = labels_BT.shape[1]
    tokens = labels_BT.new_full(labels_BT.shape, FILL_TOKEN)
    targets = labels_BT.new_full(labels_BT.shape, IGNORE_INDEX)
    tokens[:, : seq - k] = labels_BT[:, k - 1 : seq - 1]
    targets[:, : seq - k] = labels_BT[:, k:]
    return tokens, targets


class _JoinGradient(torch.autograd.Function):
    """Identity on `loss`; its backward also sends `loss`'s incoming gradient to `extra`, so the
    value stays `loss` while the gradient is that of loss + extra, under whatever scale the loss
    is backpropagated with (gradient accumulation, pipeline schedules)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad


class MTPDepth(nn.Module):
    """One MTP depth (Megatron-Core's MultiTokenPredictionLayer): `forward(h, e)` maps the
    previous depth's output h and the shifted tokens' embedding e, both (B, T, H), to this
    depth's output (B, T, H). `stack` runs the MTP part's blocks (the model's Decoder over
    them, without a final norm)."""

    def __init__(self, config: ModelConfig, kernels: BoundKernels, stack: nn.Module):
        super().__init__()
        H, eps = config.hidden_size, config.layernorm_epsilon
        self.enorm = RMSNorm(H, eps, kernels)
        self.hnorm = RMSNorm(H, eps, kernels)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.mtp_model_layer = stack
        self.final_layernorm = RMSNorm(H, eps, kernels)

    def forward(self, hidden_BTH: torch.Tensor, embedded_BTH: torch.Tensor) -> torch.Tensor:
        x_BTH = self.eh_proj(torch.cat((self.enorm(embedded_BTH), self.hnorm(hidden_BTH)), -1))
        return self.final_layernorm(self.mtp_model_layer(x_BTH))


class MultiTokenPrediction(nn.Module):
    """The MTP depths of a model (or of its last pipeline stage): `layers[d]` is depth d + 1.

    The per-depth losses of the training forwards since `take_logged_losses()` accumulate on the
    device (a buffer, no host synchronization)."""

    def __init__(self, config: ModelConfig, kernels: BoundKernels, stacks: list[nn.Module]):
        super().__init__()
        self.kernels = kernels
        self.scaling_factor = config.mtp_loss_scaling_factor
        self.layers = nn.ModuleList(MTPDepth(config, kernels, stack) for stack in stacks)
        # Per depth the sum of its losses, then the number of forwards summed. Not in
        # checkpoints; restored after a pipeline's shape-inference pass like any buffer.
        self.register_buffer("logged_losses", torch.zeros(len(stacks) + 1), persistent=False)

    def depth_losses(
        self,
        hidden_BTH: torch.Tensor,
        labels_BT: torch.Tensor,
        embedding: nn.Module,
        output_weight: torch.Tensor,
    ) -> list[torch.Tensor]:
        """L_1 .. L_D (module docstring) for the main decoder's output `hidden_BTH` and the
        next-token `labels_BT`, each through the bound `linear_cross_entropy` kernel. Raises
        ValueError for a sequence too short to give the last depth a target."""
        seq, depths = labels_BT.shape[1], len(self.layers)
        if seq <= depths:
            raise ValueError(
                f"a sequence of {seq} tokens leaves multi-token-prediction depth {depths} no "
                f"position to predict (depth k predicts k + 1 tokens ahead): use a sequence "
                f"length above {depths} (--seq-length) or fewer '/' parts in the pattern"
            )
        losses = []
        for k, depth in enumerate(self.layers, start=1):
            tokens_BT, targets_BT = depth_tokens_and_targets(labels_BT, k)
            hidden_BTH = depth(hidden_BTH, embedding(tokens_BT))
            losses.append(
                self.kernels.linear_cross_entropy(
                    hidden_BTH, output_weight, targets_BT, ignore_index=IGNORE_INDEX
                )
            )
        return losses

    def add_loss(
        self,
        main_loss: torch.Tensor,
        hidden_BTH: torch.Tensor,
        labels_BT: torch.Tensor,
        embedding: nn.Module,
        output_weight: torch.Tensor,
    ) -> torch.Tensor:
        """`main_loss`, unchanged in value, whose backward also trains on
        mtp_loss_scaling_factor x the mean of the depths' losses (module docstring)."""
        losses = torch.stack(self.depth_losses(hidden_BTH, labels_BT, embedding, output_weight))
        with torch.no_grad():
            self.logged_losses[:-1] += losses.detach().to(self.logged_losses.dtype)
            self.logged_losses[-1] += 1
        mtp_loss = self.scaling_factor * losses.mean()
        return _JoinGradient.apply(main_loss, mtp_loss.to(main_loss.dtype))

    def take_logged_losses(self) -> torch.Tensor:
        """(sum of each depth's losses, number of forwards) since the last call, on the device;
        resets them."""
        taken = self.logged_losses.clone()
        self.logged_losses.zero_()
        return taken
