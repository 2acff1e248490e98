"""Tensor parallelism with DTensor (`parallelize_module`), applied per mixer from its spec.

Each mixer's spec declares how its parameters split (`MixerSpec.tensor_parallel`,
megatron_hybrid/specs/): column-parallel linears (per packed part where one packs several),
row-parallel linears whose output is summed over the ranks, and rows of other parameters the
mixer reads directly, whose forward then runs on this rank's rows. The layers read their local
head and group counts off the sharded weights' shapes, so nothing here rewrites a module's
attributes. Today:

- Attention: `linear_qkv` column-parallel, `linear_proj` row-parallel (whole query groups).
- MLP: `linear_fc1` column-parallel (SwiGLU's [gate; up] per part), `linear_fc2` row-parallel.
- Mamba2: heads and groups over the ranks: `in_proj` per packed part z/x/B/C/dt, the conv1d
  channels per part x/B/C, dt_bias, A_log, D and the gated norm's weight on heads, `out_proj`
  row-parallel.
- Gated DeltaNet: key and value heads over the ranks: `in_proj` per packed part
  q/k/v/z/beta/alpha, the conv1d channels per part q/k/v, dt_bias and A_log on value heads,
  `out_proj` row-parallel; the output norm's weight, shared by all heads, replicated with its
  gradient summed over the ranks.
- MLA: heads over the ranks (the up-projections column-parallel, `linear_proj` row-parallel);
  the down-projections and latent norms replicated; the shared rope key's gradient summed over
  the ranks where it enters the heads.
- DSA: as MLA, with the lightning indexer replicated; its loss's target, a sum over heads, is
  summed over the ranks.
- MoE (`E`): split by megatron_hybrid/parallel/expert_parallel.py, not here.

Per-part splits store the packed weights rank-major (megatron_hybrid/parallel/packed.py); the
checkpoint hooks map them back to the canonical layout, so checkpoints do not depend on tp.
Embedding and output layer stay replicated, and so do an MTP depth's own norms and eh_proj; its
blocks are split like the decoder's.

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

from megatron_hybrid.blocks import HybridBlock
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.packed import PackedRows, mark_packed
from megatron_hybrid.pattern import SYMBOL_NAMES
from megatron_hybrid.specs import SPECS, implemented_listing
from megatron_hybrid.specs.base import (
    ActivationStyle,
    ColumnParallel,
    EntersHeads,
    PackedParts,
    ReplicatedSummedGradient,
    RowParallel,
    SplitRows,
    SumOverHeads,
    TensorParallelPlan,
)


def tensor_parallel_problems(config: ModelConfig, tp: int) -> list[str]:
    """What keeps `config` from running with tensor-parallel size `tp` (empty: it fits): the
    sizes each mixer's plan needs divisible by tp. MoE layers are checked by
    `expert_parallel_problems`."""
    counts = config.pattern.layer_counts()
    problems = []
    unsupported = sorted(s for s, n in counts.items() if n and s not in SPECS)
    if unsupported:
        problems.append(
            f"layer symbols {' '.join(unsupported)} have no tensor-parallel plan yet "
            f"(implemented: {implemented_listing()})"
        )
    for symbol, spec in SPECS.items():
        if not counts[symbol]:
            continue
        for name, flag in spec.tensor_parallel.divisible:
            value = getattr(config, name)
            if value % tp:
                valid = [d for d in range(1, value + 1) if value % d == 0]
                problems.append(
                    f"{flag} {value} is not divisible by --tensor-model-parallel-size "
                    f"{tp} (sizes that divide it: {', '.join(map(str, valid))})"
                )
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


def shard_mixer(
    mixer: nn.Module,
    plan: TensorParallelPlan,
    tp_mesh: DeviceMesh,
    output_layout: Placement | None = None,
) -> None:
    """Split `mixer`'s parameters over `tp_mesh` in place as `plan` declares; a row-parallel
    output is summed onto `output_layout` (default: replicated). Entries of other styles
    (replicated, split elsewhere) are left alone, as are entries for parameters this mixer
    lacks (optional parts). Marked activations get their reductions over the ranks."""
    styles = module_styles(mixer, plan, output_layout)
    if styles:
        parallelize_module(mixer, tp_mesh, styles)
    rows = [
        name
        for name, style in plan.parameters.items()
        if isinstance(style, SplitRows) and _has_parameter(mixer, name)
    ]
    for name in rows:
        _split_rows(mixer, name, plan.parameters[name].parts, tp_mesh)
    if rows:
        _forward_on_local_shards(mixer, tuple(rows))
    shared = [
        name
        for name, style in plan.parameters.items()
        if isinstance(style, ReplicatedSummedGradient)
    ]
    for name in shared:
        _replicate_summing_gradient(*_owner(mixer, name), tp_mesh)
    if shared:
        _forward_on_local_shards(mixer, tuple(shared), grad_placements=(Partial(),))
    for name, style in plan.activations.items():
        _reduce_activation(mixer.get_submodule(name), style, tp_mesh)


def module_styles(
    mixer: nn.Module, plan: TensorParallelPlan, output_layout: Placement | None = None
) -> dict[str, ParallelStyle]:
    """The `parallelize_module` plan of `plan`'s linears, by submodule name: column-parallel
    (per packed part: stored rank-major first) and row-parallel with the output redistributed
    to `output_layout`."""
    styles: dict[str, ParallelStyle] = {}
    for name, style in plan.parameters.items():
        if not _has_parameter(mixer, name):
            continue
        path = name.rpartition(".")[0]
        if isinstance(style, ColumnParallel):
            parts = _parts(style.parts, mixer)
            styles[path] = PackedColwiseParallel(parts) if parts else ColwiseParallel()
        elif isinstance(style, RowParallel):
            styles[path] = RowwiseParallel(output_layouts=output_layout or Replicate())
        else:
            continue
        assert isinstance(mixer.get_submodule(path), nn.Linear), (name, mixer)
    return styles


def mlp_plan(mlp: nn.Module, output_layout: Placement | None = None) -> dict[str, ParallelStyle]:
    """The `parallelize_module` plan of a dense MLP (the `-` spec's), also for a MoE's shared
    expert."""
    return module_styles(mlp, SPECS["-"].tensor_parallel, output_layout)


def _has_parameter(mixer: nn.Module, name: str) -> bool:
    try:
        mixer.get_parameter(name)
    except AttributeError:
        return False
    return True


def _reduce_activation(marker: nn.Module, style: ActivationStyle, tp_mesh: DeviceMesh) -> None:
    """Make the identity `marker`'s output carry `style`'s reduction over the ranks: DTensor
    redistributions, so the backward is their transpose."""

    def enters_heads(module, inputs, output):
        # Replicated forward; the gradient that comes back is a per-rank partial sum.
        whole = DTensor.from_local(output, tp_mesh, [Replicate()], run_check=False)
        return whole.to_local(grad_placements=[Partial()])

    def sum_over_heads(module, inputs, output):
        assert not output.requires_grad, "SumOverHeads is for values outside the autograd graph"
        partial = DTensor.from_local(output, tp_mesh, [Partial()], run_check=False)
        return partial.redistribute(tp_mesh, [Replicate()]).to_local()

    assert isinstance(marker, nn.Identity), marker
    hooks = {EntersHeads: enters_heads, SumOverHeads: sum_over_heads}
    marker.register_forward_hook(hooks[type(style)])


def _parts(parts: PackedParts | None, mixer: nn.Module) -> tuple[int, ...] | None:
    return None if parts is None else parts(mixer)


def _split_rows(
    mixer: nn.Module, name: str, parts: PackedParts | None, tp_mesh: DeviceMesh
) -> None:
    """Parameter `name` of `mixer` -> a DTensor split along dim 0 (rank-major first when it
    packs parts)."""
    owner, leaf = _owner(mixer, name)
    packed = _parts(parts, mixer)
    if packed:
        _store_parameter_rank_major(owner, leaf, PackedRows(packed, tp_mesh.size()))
    param = getattr(owner, leaf)
    owner.register_parameter(
        leaf,
        nn.Parameter(
            distribute_tensor(param.detach(), tp_mesh, [Shard(0)]),
            requires_grad=param.requires_grad,
        ),
    )


def _replicate_summing_gradient(module: nn.Module, name: str, mesh: DeviceMesh) -> None:
    """Parameter `name` of `module` -> a replicated DTensor whose gradient, a partial sum on
    each rank (`_forward_on_local_shards` with `Partial` gradients), is summed over the ranks
    once accumulated."""
    param = getattr(module, name)
    replicated = nn.Parameter(
        DTensor.from_local(param.detach(), mesh, [Replicate()], run_check=False),
        requires_grad=param.requires_grad,
    )
    module.register_parameter(name, replicated)
    replicated.register_post_accumulate_grad_hook(_sum_partial_gradient)


class SequenceParallelNorm(ParallelStyle):
    """An RMSNorm on this rank's slice of the sequence. Its weight becomes a replicated DTensor;
    `forward` and `add_and_norm` run the bound kernel on plain local tensors (so fused and
    Triton norms work unchanged), and the weight's gradient -- from this rank's tokens only --
    comes back `Partial` and is summed over the ranks (by FSDP when it shards the weight, else
    right after it is accumulated)."""

    def _apply(self, norm: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _replicate_summing_gradient(norm, "weight", device_mesh)
        _forward_on_local_shards(
            norm, ("weight",), methods=("forward", "add_and_norm"), grad_placements=(Partial(),)
        )
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
            local = (
                DTensor.from_local(x_BTH, device_mesh, [Replicate()], run_check=False)
                .redistribute(device_mesh, [Shard(1)])
                .to_local()
            )
            out = (
                DTensor.from_local(forward(local), device_mesh, [Shard(1)], run_check=False)
                .redistribute(device_mesh, [Replicate()])
                .to_local()
            )
            return out[:, :seq]

        decoder.forward = run_on_sequence_slices
        return decoder


def apply_tensor_parallel(
    model: HybridModel, tp_mesh: DeviceMesh, sequence_parallel: bool = False, log=print
) -> None:
    """Shard every mixer of `model` over `tp_mesh` in place, as its spec's plan declares (MoE
    layers are left to `apply_expert_parallel`); with `sequence_parallel`, split the residual
    stream and the norms along the sequence too (see the module docstring)."""
    tp = tp_mesh.size()
    # A mixer's output projection all-reduces, or reduce-scatters onto the sequence slices.
    output_layout = Shard(1) if sequence_parallel else Replicate()
    counts = dict.fromkeys(SPECS, 0)
    for stack in model.block_stacks():  # the decoder, then each MTP depth's blocks
        for block in stack.layers.values():
            for side in block.sides():
                shard_mixer(side.mixer, SPECS[side.symbol].tensor_parallel, tp_mesh, output_layout)
                counts[side.symbol] += 1
            if sequence_parallel:
                _split_block_sequence(block, tp_mesh)
        if sequence_parallel:
            parallelize_module(stack, tp_mesh, SequenceParallelDecoder())
    if sequence_parallel:
        if model.decoder.final_norm is not None:
            parallelize_module(model.decoder.final_norm, tp_mesh, SequenceParallelNorm())
    sharded = ", ".join(
        f"{n} {SYMBOL_NAMES[s]}"
        for s, n in counts.items()
        if n and SPECS[s].tensor_parallel.reduces_output
    )
    log(
        f"tensor parallel over {tp} ranks: {sharded or 'no'} layers"
        + ("; sequence parallel norms and residual stream" if sequence_parallel else "")
    )


def _split_block_sequence(block: HybridBlock, tp_mesh: DeviceMesh) -> None:
    """Sequence parallelism in one block whose mixers are already tensor-parallel: norms on the
    local slice, each mixer gathering the sequence at its input (a DTensor, so the backward
    reduce-scatters; a plain tensor for a mixer with replicated parameters, whose input gradient
    its own reductions have already summed); a mixer whose output is not reduced (MoE) splits its
    output again."""
    gather = PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate())
    gather_local = PrepareModuleInput(
        input_layouts=Shard(1), desired_input_layouts=Replicate(), use_local_output=True
    )
    gather_and_split = PrepareModuleInputOutput(
        input_layouts=Shard(1),
        desired_input_layouts=Replicate(),
        use_local_input=True,
        output_layouts=Replicate(),
        desired_output_layouts=Shard(1),
        use_local_output=True,
    )
    for side in block.sides():
        parallelize_module(side.norm, tp_mesh, SequenceParallelNorm())
        plan = SPECS[side.symbol].tensor_parallel
        if not plan.reduces_output:
            style = gather_and_split
        else:
            style = gather_local if plan.takes_local_input else gather
        parallelize_module(side.mixer, tp_mesh, style)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return module.get_submodule(path), leaf


def store_rank_major(module: nn.Module, packed: PackedRows) -> None:
    """Reorder `module`'s packed parameters (weight, bias) rank-major along `packed.dim` and
    mark them for the checkpoint hooks. Call on the full tensors, before they are sharded."""
    for name, _ in list(module.named_parameters(recurse=False)):
        _store_parameter_rank_major(module, name, packed)


@torch.no_grad()
def _store_parameter_rank_major(module: nn.Module, name: str, packed: PackedRows) -> None:
    param = getattr(module, name)
    assert param.shape[packed.dim] == packed.rows, (name, tuple(param.shape), packed)
    param.copy_(packed.to_rank_major(param))
    mark_packed(module, name, packed)


def _forward_on_local_shards(
    module: nn.Module,
    names: tuple[str, ...],
    methods: tuple[str, ...] = ("forward",),
    grad_placements=None,
) -> None:
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
