"""`HybridModel`: embedding -> physical blocks from the pattern -> final norm -> output layer.

The module tree matches Megatron's names:

    embedding.word_embeddings      decoder.layers[str(p)]      decoder.final_norm
    output_layer                   (absent when embeddings and output weights are tied)

The model's kernels (kernels/registry.py) are bound once per instance and handed
to every layer; the default is the eager reference everywhere.

`decoder.layers` is a ModuleDict keyed by the global physical block index, so a pipeline stage
that holds blocks 4..7 still names them `decoder.layers.4` ... `decoder.layers.7`.

A pipeline stage is a `HybridModel` built with a `StageSpec`: only its blocks, the embedding on
the first stage, the final norm and output layer on the last. Its `forward` maps token ids (first
stage) or hidden states (later stages) to hidden states (inner stages) or logits (last stage).
With tied embeddings the last stage holds its own copy of `embedding.word_embeddings` for the
output projection: same canonical key, same initial value, gradients summed with the first
stage's copy by the pipeline (megatron_hybrid/parallel/pipeline.py).

Multi-token prediction (the pattern's '/' parts, megatron_hybrid/mtp.py) is `mtp`, on the last
stage, after the final norm: with labels in training its depths add their loss to the gradient.
It embeds the shifted tokens with the shared embedding, so a last stage with MTP holds its copy
of the embedding table whether or not the output layer is tied to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.blocks import HybridBlock, check_implemented
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.init import initialize_parameters
from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.layers.moe import MoELayer, TopKRouter
from megatron_hybrid.layers.norm import RMSNorm
from megatron_hybrid.mtp import MultiTokenPrediction


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids_BT)


@dataclass(frozen=True)
class StageSpec:
    """What one pipeline stage of a model holds: physical blocks (global indices, in order),
    whether it starts the model (embedding) and whether it ends it (final norm, output)."""

    blocks: tuple[int, ...]
    first: bool
    last: bool


class Decoder(nn.Module):
    """Physical blocks (`blocks`: indices into `all_blocks`, by default every block of the main
    decoder) and an optional final norm. An MTP depth runs its part's blocks in one
    (`all_blocks=config.pattern.mtp_blocks`, no final norm)."""

    def __init__(
        self,
        config: ModelConfig,
        kernels: BoundKernels | None = None,
        blocks: tuple[int, ...] | None = None,
        final_norm: bool = True,
        all_blocks: tuple[str, ...] | None = None,
    ):
        super().__init__()
        all_blocks = config.pattern.blocks if all_blocks is None else all_blocks
        indices = range(len(all_blocks)) if blocks is None else blocks
        self.layers = nn.ModuleDict(
            {str(p): HybridBlock(all_blocks[p], config, kernels) for p in indices}
        )
        self.final_norm = (
            RMSNorm(config.hidden_size, config.layernorm_epsilon, kernels) if final_norm else None
        )

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        for block in self.layers.values():
            x_BTH = block(x_BTH)
        return x_BTH if self.final_norm is None else self.final_norm(x_BTH)


class HybridModel(nn.Module):
    """A hybrid decoder-only language model. `model(input_ids) -> logits` (B, T, vocab).

    Raises UnsupportedLayerError for pattern symbols that are not implemented yet, and
    initializes every tensor from (seed, canonical key, shape) (megatron_hybrid/init.py).
    `kernels` (from `resolve_kernels`) picks the implementation of each op for this instance
    only; None means eager everywhere. `stage` builds one pipeline stage instead of the whole
    model (see the module docstring)."""

    def __init__(
        self,
        config: ModelConfig,
        seed: int = 1234,
        kernels: BoundKernels | None = None,
        stage: StageSpec | None = None,
    ):
        super().__init__()
        check_implemented(config)
        self.config = config
        self.kernels = kernels or eager_kernels()
        self.stage = stage or StageSpec(tuple(range(config.pattern.num_blocks)), True, True)
        first, last = self.stage.first, self.stage.last
        tied = not config.untie_embeddings_and_output_weights
        with_mtp = last and config.pattern.mtp_depths > 0
        # A tied last stage keeps the embedding table for its output projection, one with MTP
        # for the shifted tokens.
        self.embedding = Embedding(config) if first or (last and (tied or with_mtp)) else None
        self.decoder = Decoder(config, self.kernels, self.stage.blocks, final_norm=last)
        if last and not tied:
            self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            self.output_layer = None
        self.mtp = build_mtp(config, self.kernels) if with_mtp else None
        self.init_weights(seed)

    @property
    def holds_embedding_copy(self) -> bool:
        """A last stage (not also first) holding its copy of the embedding (tied output weight,
        or MTP)."""
        return self.stage.last and not self.stage.first and self.embedding is not None

    def block_stacks(self) -> list[Decoder]:
        """Every module holding physical blocks (in `.layers`): the decoder, then each MTP
        depth's. The parallel wrappers treat their blocks alike."""
        depths = [] if self.mtp is None else [depth.mtp_model_layer for depth in self.mtp.layers]
        return [self.decoder, *depths]

    def init_weights(self, seed: int) -> None:
        """(Re)initialize every tensor; a model built on the meta device is left for
        `to_empty` + `init_weights` (or a checkpoint load) to fill."""
        first = next(self.parameters(), None)  # None: an empty middle pipeline stage
        if first is None or first.is_meta:
            return
        initialize_parameters(self, self.config, seed)

    def output_weight(self) -> torch.Tensor:
        if self.output_layer is None:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def hidden_states(self, input_BT: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, T, H): everything but the output projection. (For a
        pipeline stage: its blocks' output, from token ids on the first stage, from the previous
        stage's hidden states on the others.)"""
        x = self.embedding(input_BT) if self.stage.first else input_BT
        return self.decoder(x)

    def forward(
        self, input_BT: torch.Tensor, labels_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab); with `labels_BT`, the mean next-token cross-entropy instead,
        through the bound `linear_cross_entropy` kernel (the Triton one never materializes the
        logits). A pipeline stage that is not the last returns its hidden states."""
        hidden = self.hidden_states(input_BT)
        if not self.stage.last:
            return hidden
        if labels_BT is not None:
            loss = self.kernels.linear_cross_entropy(hidden, self.output_weight(), labels_BT)
            if self.mtp is not None and self.training:
                weight = self.output_weight()
                loss = self.mtp.add_loss(loss, hidden, labels_BT, self.embedding, weight)
            return loss
        return F.linear(hidden, self.output_weight())

    # -- decoding with state (megatron_hybrid/generation.py drives it) ----------------------------
    def prefill(
        self, input_BT: torch.Tensor, lengths_B: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, dict[str, object]]:
        """One pass over right-padded prompts (row b's tokens are input_BT[b, :lengths_B[b]]):
        the logits (B, vocab) at each row's last real token, and every block's decoding state
        by block name (None for blocks without a sequence mixer). `capacity` is the most tokens
        a row will reach. The whole model only: decoding runs in one process."""
        self._require_whole_model("prefill")
        x = self.embedding(input_BT)
        states = {}
        for name, block in self.decoder.layers.items():
            x, states[name] = block.prefill(x, lengths_B, capacity)
        rows = torch.arange(x.shape[0], device=x.device)
        last = self.decoder.final_norm(x[rows, lengths_B - 1])
        return F.linear(last, self.output_weight()), states

    def decode_step(self, input_B: torch.Tensor, states: dict[str, object]) -> torch.Tensor:
        """The logits (B, vocab) after one new token per row; `states` (from `prefill`)
        advance in place."""
        x = self.embedding(input_B.unsqueeze(1))
        for name, block in self.decoder.layers.items():
            x = block.step(x, states[name])
        return F.linear(self.decoder.final_norm(x[:, 0]), self.output_weight())

    def _require_whole_model(self, what: str) -> None:
        if not (self.stage.first and self.stage.last):
            raise ValueError(
                f"{what} needs the whole model in one process; this is a pipeline stage holding "
                f"blocks {self.stage.blocks} (load the checkpoint into a model built without "
                "a stage)"
            )

    # -- MoE (and auxiliary-loss) bookkeeping the training loop drives ---------------------------
    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def set_aux_loss_grad_scale(self, scale: float) -> None:
        """The factor on the gradient of every auxiliary loss (MoE load balancing, the DSA
        indexer's KL loss): the modules that add one carry `aux_loss_grad_scale`."""
        for module in self.modules():
            if hasattr(module, "aux_loss_grad_scale"):
                module.aux_loss_grad_scale = scale

    def moe_aux_loss(self) -> float | None:
        """Sum of the aux losses of the last forward pass (for logging), or None."""
        losses = [m.last_aux_loss for m in self.moe_layers() if m.last_aux_loss is not None]
        return float(sum(losses)) if losses else None

    def update_expert_biases(self, reduce_counts=None, keep: torch.Tensor | None = None) -> None:
        """Call after each optimizer step: aux-loss-free balancing of every router.
        `reduce_counts(tensor)` sums the per-expert token counts over data-parallel ranks in
        place, so every rank applies the same update. `keep`, a device scalar 1.0 or 0.0,
        applies or drops the update without the host reading it (an iteration whose optimizer
        step was skipped on the device)."""
        for module in self.modules():
            if isinstance(module, TopKRouter):
                if reduce_counts is not None and module.expert_bias is not None:
                    reduce_counts(module.tokens_per_expert)
                module.update_expert_bias(keep)

    def discard_routing_counts(self) -> None:
        """Forget the tokens counted since the last update (an iteration whose update is
        skipped must not steer the expert biases)."""
        for module in self.modules():
            if isinstance(module, TopKRouter):
                module.tokens_per_expert.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_mtp(config: ModelConfig, kernels: BoundKernels) -> MultiTokenPrediction:
    """The MTP depths of `config`'s pattern, each running the MTP part's blocks in a Decoder of
    its own (no final norm: the depth's final_layernorm follows)."""
    blocks = config.pattern.mtp_blocks
    stacks = [
        Decoder(config, kernels, final_norm=False, all_blocks=blocks)
        for _ in range(config.pattern.mtp_depths)
    ]
    return MultiTokenPrediction(config, kernels, stacks)
