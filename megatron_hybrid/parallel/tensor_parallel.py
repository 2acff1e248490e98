"""Tensor parallelism with DTensor (`parallelize_module`), applied per mixer type.

- Attention: `linear_qkv` column-parallel, `linear_proj` row-parallel. Megatron's grouped qkv
  layout keeps a query group's q heads, k and v in consecutive rows, so a contiguous row split
  hands every rank whole groups.
- MLP: `linear_fc1` column-parallel, `linear_fc2` row-parallel. SwiGLU's packed [gate; up] fc1 is
  split per part (each rank gets its gate rows and the matching up rows).
- Mamba2: heads and groups over the ranks. `in_proj` is column-parallel per packed part
  z/x/B/C/dt, the conv1d channels per packed part x/B/C; dt_bias, A_log, D and the gated norm's
  weight are split on heads; `out_proj` is row-parallel. The mixer's forward runs unchanged on
  its local heads and groups (its head/group counts are divided by tp).
- MoE (`E`): parallelized by megatron_hybrid/parallel/expert_parallel.py, not here.

Per-part splits store the packed weights rank-major (megatron_hybrid/parallel/packed.py); the
checkpoint hooks map them back to the canonical layout, so checkpoints do not depend on tp.
Embedding and output layer stay replicated.

Sequence parallelism (`--sequence-parallel`, Megatron's): the residual stream inside the decoder
is split along the sequence over the tp ranks, and the norms run on the local slice:

    decoder input --scatter--> x [B, T/tp, H] -- norm -- all-gather --> mixer (column-parallel in,
    row-parallel out) --reduce-scatter--> + x ... final norm --all-gather--> decoder output

A norm's weight is a replicated DTensor whose gradient, from this rank's tokens only, is summed
over the ranks. MoE layers see the whole sequence: it is gathered before them and split after.
Without it, norms are replicated and every mixer's output is all-reduced.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import Placement

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.layers.mamba2 import Mamba2Mixer
from megatron_hybrid.layers.mlp import MLP
from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.packed import PackedRows, mark_packed

# Symbols this module or another parallel module (E: expert_parallel.py) knows how to split.
TP_SYMBOLS = frozenset("M*-E")


def tensor_parallel_problems(config: ModelConfig, tp: int) -> list[str]:
    """What keeps `config` from running with tensor-parallel size `tp` (empty: it fits). MoE
    layers are checked by `expert_parallel_problems`."""
    counts = config.pattern.layer_counts()
    problems = []
    unsupported = sorted(s for s, n in counts.items() if n and s not in TP_SYMBOLS)
    if unsupported:
        problems.append(f"layer symbols {' '.join(unsupported)} have no tensor-parallel plan yet "
                        "(implemented: M Mamba2, * attention, - MLP, E MoE)")

    def divisible(name: str, flag: str) -> None:
        value = getattr(config, name)
        if value % tp:
            valid = [d for d in range(1, value + 1) if value % d == 0]
            problems.append(f"{flag} {value} is not divisible by --tensor-model-parallel-size "
                            f"{tp} (sizes that divide it: {', '.join(map(str, valid))})")

    if counts["*"]:
        divisible("num_attention_heads", "--num-attention-heads")
        divisible("num_query_groups", "--num-query-groups")
    if counts["M"]:
        divisible("mamba_num_heads", "--mamba-num-heads")
        divisible("mamba_num_groups", "--mamba-num-groups")
    if counts["-"]:
        divisible("ffn_hidden_size", "--ffn-hidden-size")
    return problems


class PackedColwiseParallel(ColwiseParallel):
    """`ColwiseParallel` for a linear whose output rows pack `parts` (their sizes, in order):
    the rows are stored rank-major first, so rank r holds its slice of every part."""

    def __init__(self, parts: tuple[int, ...], **kwargs):
        super().__init__(**kwargs)
        self.parts = tuple(parts)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        store_rank_major(module, PackedRows(self.parts, device_mesh.size()))
        return super()._apply(module, device_mesh)


class Mamba2Parallel(ParallelStyle):
    """Split a `Mamba2Mixer`'s heads and groups over the mesh (see the module docstring);
    `output_layout` is the placement out_proj's output is redistributed to."""

    HEAD_PARAMETERS = ("conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight")

    def __init__(self, output_layout: Placement | None = None):
        self.output_layout = output_layout or Replicate()

    def _apply(self, mixer: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        assert isinstance(mixer, Mamba2Mixer), type(mixer)
        tp = device_mesh.size()
        d_inner, heads = mixer.d_inner, mixer.num_heads
        group_state = mixer.num_groups * mixer.state_dim
        parallelize_module(mixer, device_mesh, {
            "in_proj": PackedColwiseParallel((d_inner, d_inner, group_state, group_state, heads)),
            "out_proj": RowwiseParallel(output_layouts=self.output_layout),
        })
        store_rank_major(mixer.conv1d, PackedRows((d_inner, group_state, group_state), tp))
        for name in self.HEAD_PARAMETERS:
            owner, leaf = _owner(mixer, name)
            param = getattr(owner, leaf)
            owner.register_parameter(leaf, nn.Parameter(
                distribute_tensor(param.detach(), device_mesh, [Shard(0)]),
                requires_grad=param.requires_grad))
        mixer.num_heads //= tp
        mixer.num_groups //= tp
        mixer.d_inner //= tp
        _forward_on_local_shards(mixer, self.HEAD_PARAMETERS)
        return mixer


def mlp_plan(mlp: MLP, output_layout: Placement | None = None) -> dict[str, ParallelStyle]:
    """The `parallelize_module` plan of a dense MLP (also a MoE's shared experts):
    fc1 column-parallel (per part [gate; up] for SwiGLU), fc2 row-parallel with its output
    redistributed to `output_layout`."""
    if mlp.activation == "swiglu":
        ffn = mlp.linear_fc2.in_features
        fc1 = PackedColwiseParallel((ffn, ffn))
    else:
        fc1 = ColwiseParallel()
    return {"linear_fc1": fc1,
            "linear_fc2": RowwiseParallel(output_layouts=output_layout or Replicate())}


class SequenceParallelNorm(ParallelStyle):
    """An RMSNorm on this rank's slice of the sequence. Its weight becomes a replicated DTensor;
    `forward` and `add_and_norm` run the bound kernel on plain local tensors (so fused and
    Triton norms work unchanged), and the weight's gradient -- from this rank's tokens only --
    comes back `Partial` and is summed over the ranks (by FSDP when it shards the weight, else
    right after it is accumulated)."""

    def _apply(self, norm: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        weight = norm.weight
        replicated = nn.Parameter(
            DTensor.from_local(weight.detach(), device_mesh, [Replicate()], run_check=False),
            requires_grad=weight.requires_grad)
        norm.register_parameter("weight", replicated)
        replicated.register_post_accumulate_grad_hook(_sum_partial_gradient)
        _forward_on_local_shards(norm, ("weight",), methods=("forward", "add_and_norm"),
                                 grad_placements=(Partial(),))
        return norm


class SequenceParallelDecoder(ParallelStyle):
    """The decoder's input (the whole sequence, the same on every rank) is split along the
    sequence and its output gathered back (DTensor redistributions; their backward is the
    reverse). A length that does not divide by tp (generation) is padded at the end first:
    every layer is causal, so padding changes no earlier position's output."""

    def _apply(self, decoder: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        forward, tp = decoder.forward, device_mesh.size()

        @functools.wraps(forward)
        def run_on_sequence_slices(x_BTH: torch.Tensor) -> torch.Tensor:
            seq = x_BTH.shape[1]
            x_BTH = F.pad(x_BTH, (0, 0, 0, -seq % tp))
            local = DTensor.from_local(x_BTH, device_mesh, [Replicate()], run_check=False) \
                .redistribute(device_mesh, [Shard(1)]).to_local()
            out = DTensor.from_local(forward(local), device_mesh, [Shard(1)], run_check=False) \
                .redistribute(device_mesh, [Replicate()]).to_local()
            return out[:, :seq]

        decoder.forward = run_on_sequence_slices
        return decoder


def apply_tensor_parallel(model: HybridModel, tp_mesh: DeviceMesh,
                          sequence_parallel: bool = False, log=print) -> None:
    """Shard every Mamba2, attention and MLP layer of `model` over `tp_mesh` in place (MoE
    layers are left to `apply_expert_parallel`); with `sequence_parallel`, split the residual
    stream and the norms along the sequence too (see the module docstring)."""
    tp = tp_mesh.size()
    # A mixer's output projection all-reduces, or reduce-scatters onto the sequence slices.
    output_layout = Shard(1) if sequence_parallel else Replicate()
    counts = {"M": 0, "*": 0, "-": 0}
    for block in model.decoder.layers.values():
        if block.sequence_symbol == "*":
            attention = block.self_attention
            parallelize_module(attention, tp_mesh, {
                "linear_qkv": ColwiseParallel(),
                "linear_proj": RowwiseParallel(output_layouts=output_layout),
            })
            # The local shard holds heads/tp query heads in groups/tp whole groups.
            attention.num_heads //= tp
            attention.num_groups //= tp
        elif block.sequence_symbol == "M":
            parallelize_module(block.self_attention, tp_mesh, Mamba2Parallel(output_layout))
        if block.channel_symbol == "-":
            parallelize_module(block.mlp, tp_mesh, mlp_plan(block.mlp, output_layout))
        if sequence_parallel:
            _split_block_sequence(block, tp_mesh)
        for symbol in (block.sequence_symbol, block.channel_symbol):
            if symbol in counts:
                counts[symbol] += 1
    if sequence_parallel:
        parallelize_module(model.decoder, tp_mesh, SequenceParallelDecoder())
        if model.decoder.final_norm is not None:
            parallelize_module(model.decoder.final_norm, tp_mesh, SequenceParallelNorm())
    log(f"tensor parallel over {tp} ranks: {counts['M']} Mamba2 (heads, groups), "
        f"{counts['*']} attention (query groups), {counts['-']} MLP (ffn) layers"
        + ("; sequence parallel norms and residual stream" if sequence_parallel else ""))


def _split_block_sequence(block: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Sequence parallelism in one block whose mixers are already tensor-parallel: norms on the
    local slice, each tensor-parallel mixer gathering the sequence at its input (a DTensor, so
    the backward reduce-scatters), a MoE gathering it and splitting its output again."""
    gather = PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate())
    plan: dict[str, ParallelStyle] = {}
    if block.sequence_symbol is not None:
        plan["input_layernorm"] = SequenceParallelNorm()
        plan["self_attention"] = gather
    if block.channel_symbol is not None:
        plan["pre_mlp_layernorm"] = SequenceParallelNorm()
        plan["mlp"] = gather if block.channel_symbol != "E" else PrepareModuleInputOutput(
            input_layouts=Shard(1), desired_input_layouts=Replicate(), use_local_input=True,
            output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=True)
    parallelize_module(block, tp_mesh, plan)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return module.get_submodule(path), leaf


@torch.no_grad()
def store_rank_major(module: nn.Module, packed: PackedRows) -> None:
    """Reorder `module`'s packed parameters (weight, bias) rank-major along `packed.dim` and
    mark them for the checkpoint hooks. Call on the full tensors, before they are sharded."""
    for name, param in module.named_parameters(recurse=False):
        assert param.shape[packed.dim] == packed.rows, (name, tuple(param.shape), packed)
        param.copy_(packed.to_rank_major(param))
        mark_packed(module, name, packed)


def _forward_on_local_shards(module: nn.Module, names: tuple[str, ...],
                             methods: tuple[str, ...] = ("forward",),
                             grad_placements=None) -> None:
    """Run `module`'s `methods` with its DTensor parameters `names` replaced by their local
    shards (plain tensors whose gradients flow back into the DTensors, with `grad_placements`
    when given), so layer code written for plain tensors runs unchanged on this rank's part.
    The parameters are swapped back on return, the way torch.func.functional_call swaps them."""
    owners = [_owner(module, name) for name in names]

    def on_local_shards(method):
        @functools.wraps(method)
        def run(*args, **kwargs):
            originals = [owner._parameters[leaf] for owner, leaf in owners]
            try:
                for (owner, leaf), param in zip(owners, originals, strict=True):
                    owner._parameters[leaf] = param.to_local(grad_placements=grad_placements)
                return method(*args, **kwargs)
            finally:
                for (owner, leaf), param in zip(owners, originals, strict=True):
                    owner._parameters[leaf] = param
        return run

    for name in methods:
        setattr(module, name, on_local_shards(getattr(module, name)))


def _sum_partial_gradient(param: nn.Parameter) -> None:
    """Post-accumulate-grad hook: a gradient that is a per-rank partial sum becomes the total,
    in the parameter's placements (a DTensor redistribution: one all-reduce)."""
    if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(param.device_mesh, param.placements)
