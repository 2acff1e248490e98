"""Expert parallelism (all-to-all token dispatch) and tensor parallelism of MoE layers.

Within one MoE layer (megatron_hybrid/layers/moe.py) the router picks experts, tokens are sorted
by expert, `GroupedExperts` runs the experts on the sorted rows, and the results are unsorted and
weighted. Parallelism wraps only `GroupedExperts`, with a forward pre-hook and a forward hook:

    rows sorted by expert --[EP dispatch: all-to-all]--> rows of this rank's experts
        --[TP: identity forward, all-reduce of the input gradient]--> local expert MLPs
        --[TP: sum of the ffn-partial outputs]--[EP combine: all-to-all back]--> rows in order

- Expert parallel over mesh["ep"]: each rank holds num_experts / ep whole experts (the expert
  weights are DTensors `Shard(0)`). The per-expert row counts are exchanged first (one small
  all-to-all and one host sync), then the rows travel with torch's autograd all-to-all
  (`all_to_all_single_autograd`; torch 2.13 deprecates torch.distributed.nn.functional's in its
  favour), whose backward sends the gradients back the same way.
- Tensor parallel over mesh["tp"]: every expert's fc1 [E, F, H] is split on F (`Shard(1)`) and
  fc2 [E, H, F] on F (`Shard(2)`); each rank's outputs are partial sums, added over tp by a
  DTensor Partial -> Replicate redistribution (in expert-sorted order, so the router's weights
  multiply full outputs and its gradients stay exact and identical on every tp rank). Shared
  experts follow the dense MLP's plan (`mlp_plan`: fc1 column-, fc2 row-parallel); the router
  is replicated. SwiGLU's fc1 [E, 2F, H] packs [gate; up] on dim 1: it is stored rank-major
  along that dim first (parallel/packed.py, as the dense SwiGLU MLP's fc1 along its rows), so
  each tp rank's `Shard(1)` holds its gate rows and the matching up rows, and checkpoints keep
  the canonical order.
- Both: the expert weights live on the 2-D ("ep", "tp") sub-mesh.
- Latent MoE: `fc1_latent_proj` runs before the sort and `fc2_latent_proj` after the unsort, so
  the rows above are latent-width (the all-to-all moves L, not H, channels per row) and the
  experts run at the latent width. Both projections stay whole on every rank (Megatron-Core's
  "duplicated" linears): their input and output are the layer's replicated ones, and the
  dispatch hook's summed input gradient gives `fc1_latent_proj` its full gradient on every tp
  rank. Like the router, FSDP shards them over all data-parallel ranks.

FSDP2 then shards the experts over mesh["edp"] (parallel/fsdp.py). Checkpoints need nothing more:
DTensor shards save under their canonical keys with global shapes and load into any layout (the
checkpoint hooks present a rank-major fc1 at its canonical offsets).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import parallelize_module

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.layers.moe import GroupedExperts, MoELayer
from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.packed import PackedRows
from megatron_hybrid.parallel.tensor_parallel import mlp_plan, store_rank_major


def expert_parallel_problems(config: ModelConfig, ep: int, tp: int) -> list[str]:
    """What keeps the MoE layers of `config` from running with expert-parallel size `ep` and
    tensor-parallel size `tp` (empty: they fit)."""
    has_moe = bool(config.pattern.layer_counts().get("E"))
    problems = []
    if ep > 1:
        if not has_moe:
            problems.append(
                f"--expert-model-parallel-size {ep}: pattern {config.hybrid_layer_pattern!r} has "
                "no MoE (E) layers to split; use --expert-model-parallel-size 1"
            )
        elif config.num_moe_experts % ep:
            divisors = [
                d for d in range(1, config.num_moe_experts + 1) if config.num_moe_experts % d == 0
            ]
            problems.append(
                f"--num-experts {config.num_moe_experts} is not divisible by "
                f"--expert-model-parallel-size {ep}; valid expert-parallel sizes: "
                f"{', '.join(map(str, divisors))}"
            )
    if tp > 1 and has_moe:
        widths = [("--moe-ffn-hidden-size", config.moe_ffn_hidden_size)]
        if config.moe_shared_expert_intermediate_size is not None:
            widths.append(
                (
                    "--moe-shared-expert-intermediate-size",
                    config.moe_shared_expert_intermediate_size,
                )
            )
        for flag, width in widths:
            if width % tp:
                problems.append(
                    f"{flag} {width} is not divisible by --tensor-model-parallel-size {tp}"
                )
    return problems


def apply_expert_parallel(model: HybridModel, mesh: DeviceMesh | None, log=print) -> None:
    """Split every MoE layer of `model` over the mesh's "ep" and "tp" dimensions in place (see
    the module docstring); nothing to do for one process or ep = tp = 1. Call after
    `apply_tensor_parallel` and before activation checkpointing and FSDP."""
    if mesh is None:
        return
    ep, tp = mesh["ep"].size(), mesh["tp"].size()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if (ep == 1 and tp == 1) or not layers:
        return
    names = [name for name, size in (("ep", ep), ("tp", tp)) if size > 1]
    expert_mesh = mesh[tuple(names)] if len(names) > 1 else mesh[names[0]]
    for layer in layers:
        _shard_expert_weights(layer.experts, expert_mesh, ep, tp)
        hooks = ExpertParallelHooks(
            mesh["ep"] if ep > 1 else None,
            mesh["tp"] if tp > 1 else None,
            layer.experts.num_experts // ep,
        )
        layer.experts.register_forward_pre_hook(hooks.dispatch)
        layer.experts.register_forward_hook(hooks.combine)
        if tp > 1 and layer.shared_experts is not None:
            parallelize_module(layer.shared_experts, mesh["tp"], mlp_plan(layer.shared_experts))
    parts = []
    if ep > 1:
        parts.append(
            f"experts split over {ep} expert-parallel ranks "
            f"({layers[0].experts.num_experts // ep} each, all-to-all dispatch)"
        )
    if tp > 1:
        parts.append(f"expert and shared-expert ffn sharded over {tp} tensor-parallel ranks")
    log(f"MoE parallel: {len(layers)} layers, " + "; ".join(parts))


def _shard_expert_weights(experts: GroupedExperts, mesh: DeviceMesh, ep: int, tp: int) -> None:
    """fc1 [E, F, H] -> (Shard(0) over ep, Shard(1) over tp); fc2 [E, H, F] -> (Shard(0),
    Shard(2)); a mesh dim of size 1 is left out of `mesh` and of the placements. SwiGLU's fc1
    [E, 2F, H] is stored rank-major along dim 1 first, so Shard(1) splits gate and up alike.
    Every rank built the same full weights, so each keeps its part without a copy."""
    if tp > 1 and experts.activation == "swiglu":
        ffn = experts.linear_fc2.weight.shape[2]
        store_rank_major(experts.linear_fc1, PackedRows((ffn, ffn), tp, dim=1))
    for holder, ffn_dim in ((experts.linear_fc1, 1), (experts.linear_fc2, 2)):
        placements = [Shard(0)] * (ep > 1) + [Shard(ffn_dim)] * (tp > 1)
        sharded = distribute_tensor(holder.weight.detach(), mesh, placements, src_data_rank=None)
        holder.weight = nn.Parameter(sharded, requires_grad=holder.weight.requires_grad)


class ExpertParallelHooks:
    """The forward pre-hook and hook of one `GroupedExperts` under expert and/or tensor
    parallelism. `dispatch` keeps what `combine` needs to send the rows back (one forward at a
    time per module; a recomputed forward under activation checkpointing pairs the same way)."""

    def __init__(
        self, ep_mesh: DeviceMesh | None, tp_mesh: DeviceMesh | None, num_local_experts: int
    ):
        self.ep_group = ep_mesh.get_group() if ep_mesh is not None else None
        self.ep = ep_mesh.size() if ep_mesh is not None else 1
        self.tp_mesh = tp_mesh
        self.num_local_experts = num_local_experts
        self._route_back: tuple[list[int], list[int], torch.Tensor] | None = None

    def dispatch(self, module: nn.Module, args: tuple) -> tuple:
        """(rows sorted by global expert, rows per expert [E]) -> (rows of this rank's experts
        sorted by local expert, rows per local expert [E / ep])."""
        x_sorted_TH, tokens_per_expert_E = args
        if self.ep_group is not None:
            x_sorted_TH, tokens_per_expert_E = self._exchange(x_sorted_TH, tokens_per_expert_E)
        if self.tp_mesh is not None:
            # Identity forward; backward sums the input gradient over tp (each rank's ffn shard
            # contributes its part of it).
            x_sorted_TH = DTensor.from_local(
                x_sorted_TH, self.tp_mesh, [Replicate()], run_check=False
            ).to_local(grad_placements=[Partial()])
        return x_sorted_TH, tokens_per_expert_E

    def combine(self, module: nn.Module, args: tuple, y_TH: torch.Tensor) -> torch.Tensor:
        """Inverse of `dispatch` for the experts' outputs."""
        if self.tp_mesh is not None:
            y_TH = (
                DTensor.from_local(y_TH, self.tp_mesh, [Partial()], run_check=False)
                .redistribute(self.tp_mesh, [Replicate()])
                .to_local()
            )
        if self.ep_group is not None:
            assert self._route_back is not None, "combine without dispatch"
            sent, received, inverse = self._route_back
            self._route_back = None
            # Back to (source rank, local expert) order, then each row to the rank it came from.
            y_TH = all_to_all_single_autograd(y_TH[inverse], sent, received, self.ep_group)
        return y_TH

    def _exchange(self, x_sorted_TH: torch.Tensor, tokens_per_expert_E: torch.Tensor):
        ep, local = self.ep, self.num_local_experts
        # Experts are split in contiguous blocks, so the rows for rank j are contiguous.
        send_counts = tokens_per_expert_E.view(ep, local)  # [j, l]: rows to rank j, expert l
        recv_counts = torch.empty_like(send_counts)  # [j, l]: rows from rank j, my expert l
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.ep_group)
        sent, received = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        rows = all_to_all_single_autograd(x_sorted_TH, received, sent, self.ep_group)
        # Received rows come grouped by (source rank, local expert); the experts want them
        # grouped by (local expert, source rank).
        order = _regroup_order(recv_counts, sum(received))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        self._route_back = (sent, received, inverse)
        return rows[order], recv_counts.sum(0)


def _regroup_order(counts_JL: torch.Tensor, total: int) -> torch.Tensor:
    """Row order that turns `total` rows grouped by (j, l) -- counts_JL[j, l] rows each,
    j-major -- into rows grouped by (l, j), l-major."""
    flat = counts_JL.flatten()
    source_starts = (torch.cumsum(flat, 0) - flat).view_as(counts_JL)
    lengths = counts_JL.t().flatten()
    starts = source_starts.t().flatten()
    target_starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.repeat_interleave(starts - target_starts, lengths, output_size=total)
    return torch.arange(total, device=counts_JL.device) + offset
