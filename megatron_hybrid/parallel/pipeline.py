"""Pipeline parallelism with `torch.distributed.pipelining`, stages taken from the pattern.

Stages. A pattern with `|` has segments; with pipeline size pp their number must be a multiple
of pp, and each rank holds segments / pp *virtual* stages: rank r holds segments r, r + pp,
r + 2 pp, ... (the layout interleaved schedules expect). A pattern without `|` is split into pp
stages of (nearly) equal numbers of physical blocks, with a warning when fused blocks make the
split uneven in sub-layers (compute).

Schedules (`--pipeline-schedule`): 1f1b and gpipe for one stage per rank; interleaved-1f1b,
looped-bfs and interleaved-zero-bubble for any number (interleaved-1f1b is the default when a
rank holds several). The embedding lives on the first stage, the final norm, output layer and
loss on the last: its forward gets the labels and returns the loss through the model's own loss
path (`HybridModel.forward(hidden, labels)`, the bound `linear_cross_entropy` kernel), as one
process computes it.

Each stage is its own `HybridModel` (built with a `StageSpec`), so tensor parallelism, activation
checkpointing and FSDP apply to each as to a whole model, and a rank's stages are checkpointed
together under canonical keys (checkpointing/parts.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
)

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.model import HybridModel, StageSpec
from megatron_hybrid.pattern import HybridPattern

# --pipeline-schedule name -> (schedule class, runs several stages per rank)
SCHEDULES: dict[str, tuple[type, bool]] = {
    "1f1b": (Schedule1F1B, False),
    "gpipe": (ScheduleGPipe, False),
    "interleaved-1f1b": (ScheduleInterleaved1F1B, True),
    "looped-bfs": (ScheduleLoopedBFS, True),
    "interleaved-zero-bubble": (ScheduleInterleavedZeroBubble, True),
}


class PipelineLayoutError(ValueError):
    """A pipeline size or schedule that does not fit the pattern."""


def stage_blocks(
    pattern: HybridPattern, pp: int, warn: Callable[[str], None] | None = None
) -> list[tuple[int, ...]]:
    """The physical blocks of every (virtual) stage, in pipeline order.

    With `|` segments each segment is a stage (their number must be a multiple of pp); without,
    pp stages of nearly equal block counts."""
    if pp < 1:
        raise PipelineLayoutError(f"pipeline size must be at least 1, got {pp}")
    if pattern.num_stages > 1:
        if pattern.num_stages % pp:
            raise PipelineLayoutError(
                f"pattern {str(pattern)!r} has {pattern.num_stages} '|' segments, which "
                f"--pipeline-model-parallel-size {pp} does not divide; use a pipeline size that "
                f"divides {pattern.num_stages}, or re-cut the pattern with a multiple of {pp} "
                "segments"
            )
        return [tuple(pattern.stage_block_range(s)) for s in range(pattern.num_stages)]
    if pp == 1:
        return [tuple(range(pattern.num_blocks))]
    if pattern.num_blocks < pp:
        raise PipelineLayoutError(
            f"pattern {str(pattern)!r} has {pattern.num_blocks} blocks, fewer than "
            f"--pipeline-model-parallel-size {pp}: every stage needs at least one block"
        )
    base, extra = divmod(pattern.num_blocks, pp)
    stages, start = [], 0
    for s in range(pp):
        size = base + (s < extra)
        stages.append(tuple(range(start, start + size)))
        start += size
    layers = [sum(len(pattern.canonical_layers(b)) for b in blocks) for blocks in stages]
    if warn is not None and len(set(layers)) > 1:
        warn(
            f"pipeline: pattern {str(pattern)!r} has no '|', split evenly by blocks into "
            f"{pp} stages of {[len(b) for b in stages]} blocks, which hold {layers} sub-layers "
            "(fused blocks count two): compute is uneven; put '|' in the pattern to choose the "
            "cut"
        )
    return stages


def default_schedule(stages_per_rank: int) -> str:
    return "interleaved-1f1b" if stages_per_rank > 1 else "1f1b"


def check_pipeline_fits(config: ModelConfig, pp: int, schedule: str | None) -> list[str]:
    """What keeps `config` from a pipeline of size pp with `schedule` (empty: it fits)."""
    try:
        stages = stage_blocks(config.pattern, pp)
    except PipelineLayoutError as error:
        return [str(error)]
    problems = []
    per_rank = len(stages) // pp
    if schedule is not None:
        if schedule not in SCHEDULES:
            problems.append(
                f"unknown --pipeline-schedule {schedule!r}; valid: {', '.join(SCHEDULES)}"
            )
        elif per_rank > 1 and not SCHEDULES[schedule][1]:
            problems.append(
                f"--pipeline-schedule {schedule} runs one stage per rank, but pattern "
                f"{config.hybrid_layer_pattern!r} gives each of {pp} ranks {per_rank} stages; "
                f"use one of {', '.join(n for n, (_, multi) in SCHEDULES.items() if multi)}"
            )
    return problems


def rank_stage_specs(
    config: ModelConfig, pp: int, pp_rank: int, warn: Callable[[str], None] | None = None
) -> tuple[list[int], list[StageSpec]]:
    """(global stage indices, StageSpecs) of the stages pipeline rank `pp_rank` holds."""
    stages = stage_blocks(config.pattern, pp, warn)
    indices = list(range(pp_rank, len(stages), pp))
    specs = [StageSpec(stages[i], first=i == 0, last=i == len(stages) - 1) for i in indices]
    return indices, specs


class _Stage(PipelineStage):
    """A PipelineStage whose metadata inference leaves the model as it found it.

    On its first step (and when switching between training and evaluation) torch runs each
    stage's forward, and a backward, on placeholder tensors to learn the shapes it sends. Our MoE
    routers count the tokens they route in forward (for expert-bias balancing; with full
    recompute, again in backward) and keep the last aux loss, so that run would count
    placeholder tokens: buffers and the MoE layers' last aux loss are put back afterwards."""

    def _forward_metadata_inference(self, *args, **kwargs):
        with _state_restored(self.submod):
            return super()._forward_metadata_inference(*args, **kwargs)

    def _backward_metadata_inference(self, *args, **kwargs):
        with _state_restored(self.submod):
            return super()._backward_metadata_inference(*args, **kwargs)


@contextlib.contextmanager
def _state_restored(module: torch.nn.Module):
    """Run the body, then put `module`'s buffers and MoE `last_aux_loss` values back."""
    buffers = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
    moe = [(m, m.last_aux_loss) for m in module.modules() if hasattr(m, "last_aux_loss")]
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])
        for layer, value in moe:
            layer.last_aux_loss = value


def _stage_output_is_the_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss function: the last stage's forward already returned the loss."""
    return output


class Pipeline:
    """This rank's stages of a pipelined model and the schedule that runs them.

    pipeline = Pipeline(parts, stage_indices, num_stages, mesh["pp"], schedule, n_micro,
                        device)
    loss = pipeline.train_step(batch_inputs, batch_targets)   # mean loss, last stage only
    """

    def __init__(
        self,
        parts: Sequence[torch.nn.Module],
        stage_indices: Sequence[int],
        num_stages: int,
        pp_mesh: DeviceMesh,
        schedule: str,
        n_microbatches: int,
        device: torch.device,
    ):
        self.parts = list(parts)
        self.num_stages = num_stages
        self.group = pp_mesh.get_group()
        self.stages = [
            _Stage(part, index, num_stages, device, group=self.group)
            for part, index in zip(self.parts, stage_indices, strict=True)
        ]
        self.has_first = 0 in stage_indices
        self.has_last = num_stages - 1 in stage_indices
        cls, multi = SCHEDULES[schedule]
        # The schedule divides gradients by the number of micro-batches (scale_grads), so each
        # micro-batch's loss is its own mean, as in the non-pipelined loop.
        self.schedule = cls(
            self.stages if multi else self.stages[0],
            n_microbatches,
            loss_fn=_stage_output_is_the_loss,
        )
        self.n_microbatches = n_microbatches

    def _run(
        self, run: Callable, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor | None:
        """`run` (the schedule's step or eval) on one batch: inputs to the first stage, labels
        to the last stage's forward (a keyword argument, split into micro-batches like the
        inputs); the mean micro-batch loss on the rank holding the last stage, else None."""
        losses: list[torch.Tensor] = []
        labels = {"labels_BT": targets} if self.has_last else {}
        run(
            *((inputs,) if self.has_first else ()),
            target=targets if self.has_last else None,
            losses=losses,
            return_outputs=False,
            **labels,
        )
        return torch.stack(losses).mean() if self.has_last else None

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of one batch of `n_microbatches` micro-batches (split along
        dim 0); the mean micro-batch loss on the rank holding the last stage, else None."""
        loss = self._run(self.schedule.step, inputs, targets)
        return None if loss is None else loss.detach()

    @torch.no_grad()
    def eval_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward only; the mean micro-batch loss on the last stage's rank, else None."""
        return self._run(self.schedule.eval, inputs, targets)


class TiedEmbeddingSync:
    """Sums the gradients of the embedding table on the first stage and its copy on the last
    (tied embeddings), so both copies take the same optimizer step and stay equal.

    One process group per pipeline (pp ranks with the same data/tensor-parallel coordinates):
    the ranks of its first and last stages. Every rank takes part in creating every group."""

    def __init__(self, mesh: DeviceMesh, parts: Sequence[HybridModel]):
        self.weights = [
            part.embedding.word_embeddings.weight for part in parts if part.embedding is not None
        ]
        holds_first = any(part.stage.first for part in parts)
        holds_last = any(part.stage.last for part in parts)
        self.group = None
        ranks = mesh.mesh.reshape(mesh.mesh.shape[0], -1)  # (pp, everything else)
        for column in range(ranks.shape[1]):
            pair = sorted({int(ranks[0, column]), int(ranks[-1, column])})
            group = dist.new_group(pair) if len(pair) > 1 else None
            if dist.get_rank() in pair and (holds_first or holds_last):
                self.group = group

    def __call__(self) -> None:
        if self.group is None:
            return
        for weight in self.weights:
            grad = weight.grad
            if grad is None:
                continue
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            dist.all_reduce(local, group=self.group)
