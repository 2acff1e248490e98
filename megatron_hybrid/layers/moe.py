"""Mixture of experts: top-k router, experts computed as batched GEMMs, optional shared expert.

Routing follows Megatron-LM / Nemotron-H:
- scores are `softmax(logits)` or `sigmoid(logits)` in float32;
- experts are chosen, as in Megatron-Core's `topk_routing_with_score_function`, by the logits
  (softmax: the probabilities' order) or the probabilities (`moe_router_pre_softmax`) or the
  sigmoid scores; with `moe_router_enable_expert_bias`, by the scores plus a per-expert bias
  (aux-loss-free balancing), a buffer nudged after every optimizer step towards balanced load
  (`update_expert_bias`), never trained by gradient;
- group-limited routing (`moe_router_num_groups`, `moe_router_group_topk`; DeepSeek-V3's
  node-limited routing): each token picks its top k experts within its best groups only
  (`group_limited_topk`);
- routing weights, as Megatron-Core's `topk_routing_with_score_function`: softmax over the chosen
  experts' logits (so 1.0 at top-1); with `moe_router_pre_softmax`, the chosen entries of the
  softmax over all experts; sigmoid scores renormalized to sum to one when k > 1; then scaled by
  `moe_router_topk_scaling_factor`;
- the switch load-balancing loss (`moe_aux_loss_coeff`) counts tokens by the top-k of the scores
  *without* the expert bias (Megatron-Core's `compute_routing_scores_for_aux_loss`), and reaches
  the router through `AuxLossInjector`, which keeps `model(input_ids) -> logits` free of side
  outputs.

Latent MoE (`moe_latent_size`, Megatron-Core's; Nemotron 3's): the router reads the token at
full width, `fc1_latent_proj` (hidden -> latent) feeds the routed experts, which run at the
latent width (so expert parallelism exchanges latent-width rows), and `fc2_latent_proj` brings
their weighted sum back to the hidden width; the shared experts stay at full width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_hybrid.kernels.activations.eager import fc1_width
from megatron_hybrid.kernels.dtypes import at_least_float32
from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.layers.mlp import MLP

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig


class AuxLossInjector(torch.autograd.Function):
    """Identity on `output`; in backward, adds d(scale * aux_loss) to the graph.

    Lets an auxiliary loss computed inside a layer contribute gradients without changing what
    the layer returns (Megatron's MoEAuxLossAutoScaler does the same)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


class TopKRouter(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.score_function = config.moe_router_score_function
        self.pre_softmax = config.moe_router_pre_softmax
        self.scaling_factor = config.moe_router_topk_scaling_factor
        self.aux_loss_coeff = config.moe_aux_loss_coeff
        self.bias_update_rate = config.moe_router_bias_update_rate
        self.num_groups = config.moe_router_num_groups
        self.group_topk = config.moe_router_group_topk
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts))
        else:
            self.expert_bias = None
        # Tokens routed to each expert since the last bias update (not saved: per step).
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts), persistent=False)

    def forward(self, x_NH: torch.Tensor):
        """Returns (routing weights (N, k), expert indices (N, k), aux loss or None)."""
        logits = at_least_float32(x_NH) @ at_least_float32(self.weight).t()
        if self.score_function == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        indices = self.choose_experts(logits, scores)
        weights = scores.gather(-1, indices)
        # softmax(all)[chosen] renormalized == softmax(logits[chosen]), Megatron's non-pre-softmax
        if (self.score_function == "softmax" and not self.pre_softmax) or (
            self.score_function == "sigmoid" and self.topk > 1
        ):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scaling_factor is not None:
            weights = weights * self.scaling_factor
        counts = torch.bincount(indices.flatten(), minlength=self.num_experts)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        aux_loss = None
        if self.training and self.aux_loss_coeff > 0:
            if self.expert_bias is not None or self.num_groups is not None:
                # The loss balances the router's own preference: the top k of the unbiased
                # scores over all experts (Megatron's compute_routing_scores_for_aux_loss).
                counts = torch.bincount(
                    scores.topk(self.topk, dim=-1).indices.flatten(), minlength=self.num_experts
                )
            aux_loss = self.switch_load_balancing_loss(scores, counts)
        return weights, indices, aux_loss

    def choose_experts(self, logits_NE: torch.Tensor, scores_NE: torch.Tensor) -> torch.Tensor:
        """Each token's k experts (N, k), chosen by the values Megatron-Core chooses by (module
        docstring); the logits rank experts as softmax's probabilities do, but only they score
        groups as Megatron does."""
        if self.expert_bias is not None:
            choice = scores_NE + self.expert_bias
        elif self.score_function == "softmax" and not self.pre_softmax:
            choice = logits_NE
        else:
            choice = scores_NE
        if self.num_groups is None:
            return choice.topk(self.topk, dim=-1).indices
        return group_limited_topk(choice, self.topk, self.num_groups, self.group_topk)

    def switch_load_balancing_loss(self, scores_NE: torch.Tensor, counts_E: torch.Tensor):
        """coeff * E / (k * N^2) * sum_e (tokens routed to e) * (sum of e's scores): 1*coeff when
        perfectly balanced (Megatron's switch_load_balancing_loss_func)."""
        if self.score_function == "sigmoid":
            scores_NE = scores_NE / (scores_NE.sum(dim=-1, keepdim=True) + 1e-20)
        num_tokens = scores_NE.shape[0]
        aggregated = scores_NE.sum(dim=0)
        scale = self.num_experts * self.aux_loss_coeff / (self.topk * num_tokens * num_tokens)
        return (aggregated * counts_E.to(aggregated.dtype)).sum() * scale

    @torch.no_grad()
    def update_expert_bias(self, keep: torch.Tensor | None = None) -> None:
        """Nudge the bias of under-loaded experts up and over-loaded ones down by the update rate,
        using the tokens counted since the last call; then reset the counts. `keep` (a device
        scalar, 1.0 or 0.0) scales the update: 0.0 drops it without a host synchronization."""
        if self.expert_bias is not None:
            load = self.tokens_per_expert
            update = torch.sign(load.mean() - load) * self.bias_update_rate
            self.expert_bias += update if keep is None else update * keep
        self.tokens_per_expert.zero_()


def group_limited_topk(
    choice_NE: torch.Tensor, topk: int, num_groups: int, group_topk: int
) -> torch.Tensor:
    """Megatron-Core's group-limited top-k (`moe_utils.group_limited_topk`): the E experts form
    `num_groups` consecutive groups of E / num_groups; each token keeps the `group_topk` groups
    with the largest sums of their top (topk // group_topk) choice values and takes its top
    `topk` experts from those. Returns expert indices (N, topk).

    (transformers' nemotron_h sums every group's top 2 instead: the same rule exactly when
    topk // group_topk == 2, as in DeepSeek-V3; checkpointing/hf_nemotron_h.py checks it.)"""
    num_tokens, num_experts = choice_NE.shape
    grouped = choice_NE.reshape(num_tokens, num_groups, num_experts // num_groups)
    group_scores = grouped.topk(topk // group_topk, dim=-1).values.sum(dim=-1)
    best_groups = group_scores.topk(group_topk, dim=-1).indices
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    allowed = grouped.masked_fill(~kept.unsqueeze(-1), float("-inf"))
    return allowed.reshape(num_tokens, num_experts).topk(topk, dim=-1).indices


class GroupedExperts(nn.Module):
    """`num_experts` MLPs stored as stacked weights: linear_fc1 (E, F', H), linear_fc2 (E, H, F),
    H being the experts' input width (`moe_expert_input_size`: the latent width in a latent MoE).

    `forward(x_sorted_TH, tokens_per_expert_E)` takes token rows already grouped by expert
    (`tokens_per_expert_E[e]` consecutive rows for expert e, in expert order) and returns their
    MLP outputs in the same order. The MoE layer sorts and unsorts around it, so expert and
    tensor parallelism (megatron_hybrid/parallel/expert_parallel.py) wrap just this module: its
    hooks exchange the rows between ranks (all-to-all) and the weights become DTensor shards, of
    which the forward computes with the local part."""

    def __init__(self, config: ModelConfig, kernels: BoundKernels | None = None):
        super().__init__()
        E, H, F = config.num_moe_experts, config.moe_expert_input_size, config.moe_ffn_hidden_size
        self.num_experts = E
        self.activation = config.activation
        self.kernels = kernels or eager_kernels()
        self.linear_fc1 = _WeightOnly(torch.empty(E, fc1_width(F, config.activation), H))
        self.linear_fc2 = _WeightOnly(torch.empty(E, H, F))

    def forward(self, x_sorted_TH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return self.experts(
            x_sorted_TH,
            tokens_per_expert_E,
            _local(self.linear_fc1.weight),
            _local(self.linear_fc2.weight),
            self.activation,
        )

    def experts(
        self,
        x_sorted_TH: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        fc1_EFH: torch.Tensor,
        fc2_EHF: torch.Tensor,
        activation: str,
    ) -> torch.Tensor:
        """Every expert's MLP `fc2_e(act(fc1_e(x)))` on its rows of `x_sorted_TH` (T, H), rows
        grouped by expert in order, `tokens_per_expert_E` rows each; E is the number of experts
        in the given weights (the local ones under expert parallelism). `activation` names the
        MLP activation ("squared_relu", "swiglu").

        Runs the model's bound `moe.experts` kernel: eager packs rows into an
        (E, capacity, H) buffer for one batched matmul (one host sync for the capacity); the
        Triton grouped GEMM walks the sorted rows with an on-device tile schedule, no sync."""
        return self.kernels["moe.experts"](
            x_sorted_TH, tokens_per_expert_E, fc1_EFH, fc2_EHF, activation
        )


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of a weight: the local shard of a DTensor (expert or tensor parallel),
    the weight itself otherwise. (Duck-typed: the model files import nothing from
    torch.distributed.)"""
    to_local = getattr(weight, "to_local", None)
    return weight if to_local is None else to_local()


class MoELayer(nn.Module):
    """Router -> tokens sorted by expert -> experts -> unsorted, weighted and summed per token
    (+ shared experts); in a latent MoE the experts' rows pass through `fc1_latent_proj` before
    and their sums through `fc2_latent_proj` after (module docstring)."""

    def __init__(self, config: ModelConfig, kernels: BoundKernels | None = None):
        super().__init__()
        kernels = kernels or eager_kernels()
        self.router = TopKRouter(config)
        self.fc1_latent_proj = self.fc2_latent_proj = None
        if config.moe_latent_size is not None:  # no bias: Megatron's add_bias_linear=False
            H, L = config.hidden_size, config.moe_latent_size
            self.fc1_latent_proj = nn.Linear(H, L, bias=False)
            self.fc2_latent_proj = nn.Linear(L, H, bias=False)
        self.experts = GroupedExperts(config, kernels)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size is not None:
            self.shared_experts = MLP(
                config.hidden_size,
                config.moe_shared_expert_intermediate_size,
                config.activation,
                kernels,
            )
        # Set by the training loop to 1 / (micro-batches per step) so aux gradients average like
        # the language-model loss does.
        self.aux_loss_grad_scale = 1.0
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        shape = x_BTH.shape
        x_NH = x_BTH.reshape(-1, shape[-1])
        weights, indices, aux_loss = self.router(x_NH)
        if self.fc1_latent_proj is None:
            out = self.routed_experts(x_NH, weights, indices)
        else:
            out = self.routed_experts(self.fc1_latent_proj(x_NH), weights, indices)
            out = self.fc2_latent_proj(out)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_NH)
        if aux_loss is not None:
            self.last_aux_loss = aux_loss.detach()
            out = AuxLossInjector.apply(out, aux_loss, self.aux_loss_grad_scale)
        return out.view(shape)

    def routed_experts(
        self, x_NH: torch.Tensor, weights_NK: torch.Tensor, indices_NK: torch.Tensor
    ) -> torch.Tensor:
        """sum_k weights[n, k] * expert_{indices[n, k]}(x[n]) for every token n, in x's dtype
        (summed in at least float32)."""
        topk = indices_NK.shape[1]
        flat_expert = indices_NK.flatten()
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // topk
        tokens_per_expert = torch.bincount(flat_expert, minlength=self.experts.num_experts)
        out = self.experts(x_NH[token_of], tokens_per_expert)
        routed = out * weights_NK.flatten()[order].unsqueeze(-1).to(out.dtype)
        # Under autocast the GEMMs return bf16, and so does fc1_latent_proj (whose output is x
        # here in a latent MoE): a token's k outputs are summed in float32, rounded once.
        sum_dtype = torch.promote_types(x_NH.dtype, torch.float32)
        total = torch.zeros(x_NH.shape, dtype=sum_dtype, device=x_NH.device)
        return total.index_add_(0, token_of, routed.to(sum_dtype)).to(x_NH.dtype)


class _WeightOnly(nn.Module):
    """Holds one parameter under the name `weight`, so keys read `experts.linear_fc1.weight`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
