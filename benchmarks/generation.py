#!/usr/bin/env python3
"""Decoding speed with recurrent state: time per new token and decode tokens/s at growing
context lengths, against full recomputation and (with --hf) Hugging Face `nemotron_h`'s
`generate()` with its cache on the same weights.

For every config and context length n (a batch of --batch random prompts of n tokens, random
weights):

- prefill_ms:        HybridModel.prefill over the prompts (one chunked pass, states returned);
- step_ms:           median time of one HybridModel.decode_step (one token per row) over
                     --steps steps after the prefill: the cost of a new token with the state
                     cache (step_min_ms: the fastest). The steps of all contexts are timed in
                     --rounds interleaved rounds, so a busy stretch of a shared machine falls on
                     every context alike. A Mamba2 layer's step does not depend on n; attention's
                     reads its KV cache, which grows with n;
- graph_step_ms:     on CUDA, the same step replayed from a CUDA graph (GraphedDecodeStep,
                     megatron_hybrid/decode_graph.py: one launch instead of one per kernel),
                     timed after the eager steps on the same states;
- generate_ms:       with --generate (default on CUDA), (time of generate() for --steps + 1
                     tokens - time for 1 token) / --steps: decoding through
                     megatron_hybrid.generation.generate (through a CUDA graph where it can),
                     sampling included, measured as the HF row is;
- recompute_ms:      one forward over the n tokens, what generating a token costs without a
                     cache (the old generate()): grows at least linearly with n;
- hf_generate_ms:    with --hf, HF's generate() (use_cache=True, greedy) timed as generate_ms,
                     on our weights exported with save_hf_checkpoint (configs HF can express;
                     transformers 5.25 cannot generate from a model without attention layers,
                     so gpu-mamba has no HF row);
- tokens/s:          batch * 1000 / ms, for step, generate and hf_generate.

CPU runs float32 with the eager kernels; CUDA runs --dtype (bf16 default) with --kernels auto
(Triton SSD, decoding steps and the rest). The check the CPU run states: step_ms at the largest
context within 2x of the smallest on the Mamba-only config, while recompute_ms grows.

    python benchmarks/generation.py --threads 1 --json benchmarks/results/cpu-generation.json
    python benchmarks/generation.py --hf --json out.json            # CUDA: gpu-mamba, gpu-hybrid
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile

import torch
from timing import Stopwatch, call_times_ms, synchronize  # benchmarks/timing.py, beside this

# transformers (--hf) imports a package named `kernels`, which benchmarks/kernels.py would
# shadow: this folder leaves sys.path once timing.py is imported.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _HERE]

from megatron_hybrid.canonical import canonical_key  # noqa: E402
from megatron_hybrid.config import ModelConfig  # noqa: E402
from megatron_hybrid.decode_graph import GraphedDecodeStep, graph_decoding_problem  # noqa: E402
from megatron_hybrid.flops import parameter_count  # noqa: E402
from megatron_hybrid.generation import GREEDY, generate  # noqa: E402
from megatron_hybrid.kernels import resolve_kernels  # noqa: E402
from megatron_hybrid.model import HybridModel  # noqa: E402

CONTEXTS = (1024, 8192, 32768)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    name: str
    model: dict  # ModelConfig fields
    gpu: bool  # part of the default set on CUDA (else on CPU)


# HF nemotron_h can express these (squared ReLU MLPs, no position embedding), so --hf runs them.
_SMALL = dict(
    hidden_size=256,
    vocab_size=512,
    ffn_hidden_size=1024,
    activation="squared_relu",
    position_embedding_type="none",
    num_attention_heads=4,
    num_query_groups=2,
    mamba_num_heads=8,
    mamba_head_dim=64,
    mamba_num_groups=1,
    mamba_state_dim=64,
    mamba_chunk_size=128,
)
_1B = dict(
    hidden_size=2048,
    vocab_size=131072,
    ffn_hidden_size=7168,
    activation="squared_relu",
    position_embedding_type="none",
    num_attention_heads=16,
    num_query_groups=8,
    kv_channels=128,
    mamba_num_heads=64,
    mamba_head_dim=64,
    mamba_num_groups=8,
    mamba_state_dim=128,
    mamba_chunk_size=128,
)
CONFIGS = {
    c.name: c
    for c in (
        BenchConfig("cpu-mamba", dict(_SMALL, hybrid_layer_pattern="MMMM"), gpu=False),
        BenchConfig("cpu-hybrid", dict(_SMALL, hybrid_layer_pattern="M-M*M-"), gpu=False),
        BenchConfig("gpu-mamba", dict(_1B, hybrid_layer_pattern="M" * 24), gpu=True),
        # hybrid-1b of benchmarks/train_throughput.py without rope: Nemotron-H's layout.
        BenchConfig(
            "gpu-hybrid", dict(_1B, hybrid_layer_pattern="M-M-M*-M-M-M*-M-M-M*-M-M-M-"), gpu=True
        ),
    )
}


def random_prompts(batch: int, length: int, vocab: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


@torch.no_grad()
def prefilled(model: HybridModel, prompts: torch.Tensor, room: int, device) -> tuple:
    """(prefill ms, the next tokens, the decoding states with `room` positions to spare)."""
    lengths = torch.full((prompts.shape[0],), prompts.shape[1], device=device)
    synchronize(device)
    watch = Stopwatch()
    logits, states = model.prefill(prompts, lengths, prompts.shape[1] + room)
    synchronize(device)
    return 1e3 * watch.elapsed_s(), logits.argmax(-1), states


@torch.no_grad()
def interleaved_step_times(model, started: list[tuple], steps: int, rounds: int, device):
    """Times (ms) of `steps` decode_steps per context, taken in `rounds` rounds that visit every
    context in turn, so a slower stretch of a shared machine is spread over all of them."""
    times = [[] for _ in started]
    per_round = -(-steps // rounds)
    for round_index in range(rounds):
        for times_of, (token, states) in zip(times, started, strict=True):
            times_of += call_times_ms(
                lambda t=token, s=states: model.decode_step(t, s),
                warmup=3 if round_index == 0 else 1,
                repeat=per_round,
                device=device,
            )
    return times


def per_token_ms(run_generate, steps: int, device, repeat: int) -> float:
    """(time for steps + 1 new tokens - time for 1) / steps, each the median of `repeat` runs:
    decoding alone, the prefill excluded."""

    def timed(new: int) -> float:
        times = []
        for _ in range(repeat):
            synchronize(device)
            watch = Stopwatch()
            run_generate(new)
            synchronize(device)
            times.append(1e3 * watch.elapsed_s())
        return statistics.median(times)

    run_generate(2)  # warm-up: allocator, kernels' first launches
    return (timed(steps + 1) - timed(1)) / steps


@torch.no_grad()
def recompute_ms(model: HybridModel, prompts: torch.Tensor, device, repeat: int) -> float:
    times = call_times_ms(lambda: model(prompts), warmup=1, repeat=repeat, device=device)
    return statistics.median(times)


def hf_model_of(model: HybridModel, dtype: torch.dtype, device):
    """transformers' NemotronHForCausalLM holding `model`'s weights (exported, then loaded)."""
    from transformers import NemotronHForCausalLM

    from megatron_hybrid.checkpointing.hf_nemotron_h import save_hf_checkpoint

    pattern = model.config.pattern
    state = {canonical_key(n, pattern): t.float().cpu() for n, t in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        save_hf_checkpoint(folder, state, model.config)
        hf = NemotronHForCausalLM.from_pretrained(folder, dtype=dtype)
    return hf.to(device).eval()


def hf_generate(hf, prompts: torch.Tensor, new: int) -> None:
    with torch.no_grad():
        hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )


def run_config(bench: BenchConfig, args, device, dtype) -> dict:
    config = ModelConfig(**bench.model)
    kernels = resolve_kernels({}, args.kernels, device)
    model = HybridModel(config, seed=0, kernels=kernels).to(device=device, dtype=dtype).eval()
    hf, hf_error = None, None
    if args.hf:
        try:
            hf = hf_model_of(model, dtype, device)
        except Exception as error:  # a config HF cannot express: our rows still run
            hf_error = f"{type(error).__name__}: {error}"
    rows, started = [], []
    room = 2 * args.steps + 4 * args.rounds + 8  # eager and graphed steps, their warm-ups
    for context in args.contexts:
        prompts = random_prompts(args.batch, context, config.vocab_size, device)
        prefill_ms, token, states = prefilled(model, prompts, room, device)
        rows.append(dict(context=context, batch=args.batch, prefill_ms=prefill_ms))
        started.append((token, states))
    step_times = interleaved_step_times(model, started, args.steps, args.rounds, device)
    for row, times in zip(rows, step_times, strict=True):
        row["step_ms"], row["step_min_ms"] = statistics.median(times), min(times)
    if graph_decoding_problem(model, device) is None:
        for row, (token, states) in zip(rows, started, strict=True):
            graphed = GraphedDecodeStep(model, states, args.batch)
            times = call_times_ms(
                lambda t=token, g=graphed: g(t), warmup=3, repeat=args.steps, device=device
            )
            row["graph_step_ms"], row["graph_step_min_ms"] = statistics.median(times), min(times)
            del graphed
    del started
    for row in rows:
        prompts = random_prompts(args.batch, row["context"], config.vocab_size, device)
        if args.generate:
            row["generate_ms"] = per_token_ms(
                lambda new, p=prompts: generate(model, list(p), new, GREEDY),
                args.steps,
                device,
                args.repeat,
            )
        if args.recompute:
            row["recompute_ms"] = recompute_ms(model, prompts, device, args.repeat)
        if hf is not None:
            try:
                row["hf_generate_ms"] = per_token_ms(
                    lambda new, p=prompts, m=hf: hf_generate(m, p, new),
                    args.steps,
                    device,
                    args.repeat,
                )
            except Exception as error:  # e.g. transformers refusing the layout: say so, go on
                hf, hf_error = None, f"{type(error).__name__}: {error}"
        for key in ("step", "graph_step", "generate", "hf_generate"):
            if f"{key}_ms" in row:
                row[f"{key}_tokens_per_s"] = args.batch * 1e3 / row[f"{key}_ms"]
        print(_row_line(bench.name, row), flush=True)
        del prompts
        gc.collect()
    return dict(
        config=bench.name,
        pattern=config.hybrid_layer_pattern,
        parameters=parameter_count(config),
        kernels=kernels.describe(),
        **({"hf_error": hf_error} if hf_error else {}),
        rows=rows,
        step_ms_largest_over_smallest_context=rows[-1]["step_ms"] / rows[0]["step_ms"],
        step_min_ms_largest_over_smallest_context=rows[-1]["step_min_ms"] / rows[0]["step_min_ms"],
    )


def _row_line(name: str, row: dict) -> str:
    parts = [f"{name} ctx {row['context']:>6}", f"prefill {row['prefill_ms']:9.1f} ms"]
    for key in ("step", "graph_step", "generate", "recompute", "hf_generate"):
        if f"{key}_ms" in row:
            parts.append(f"{key} {row[f'{key}_ms']:8.2f} ms/token")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        action="append",
        choices=sorted(CONFIGS),
        help="named config, repeatable (default: the GPU configs on CUDA, else the CPU ones)",
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    parser.add_argument(
        "--steps", type=int, default=64, help="decoding steps timed per context (default 64)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="the step timings visit the contexts in this many rounds (default 8)",
    )
    parser.add_argument(
        "--generate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time generate() end to end, as --hf times HF's (default: on CUDA only: on "
        "CPU a long prompt's prefill takes seconds and swamps the decoding time)",
    )
    parser.add_argument(
        "--recompute",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time one full forward per context (the cost of a token without a cache)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per timed generate() and full forward"
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's own choice)"
    )
    parser.add_argument("--hf", action="store_true", help="also time transformers' generate()")
    parser.add_argument("--kernels", choices=("auto", "eager"), default=None)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    args.kernels = args.kernels or ("auto" if on_cuda else "eager")
    args.generate = on_cuda if args.generate is None else args.generate
    dtype_name = args.dtype or ("bf16" if on_cuda else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    names = args.config or [n for n, c in CONFIGS.items() if c.gpu == on_cuda]
    device_name = (
        torch.cuda.get_device_name(device)
        if on_cuda
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"device: {device} ({device_name}), torch {torch.__version__}, {dtype_name}", flush=True)
    results = []
    for name in names:
        try:
            results.append(run_config(CONFIGS[name], args, device, dtype))
        except Exception as error:  # report it and go on with the other configs
            results.append(dict(config=name, error=f"{type(error).__name__}: {error}"))
            print(f"{name}: {results[-1]['error']}", file=sys.stderr, flush=True)
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    for result in results:
        if "hf_error" in result:
            print(f"{result['config']}: no HF row: {result['hf_error']}")
        if "rows" in result:
            print(
                f"{result['config']}: step time at {result['rows'][-1]['context']} tokens / at "
                f"{result['rows'][0]['context']}: "
                f"{result['step_ms_largest_over_smallest_context']:.2f}x (median), "
                f"{result['step_min_ms_largest_over_smallest_context']:.2f}x (fastest)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    benchmark="generation",
                    device=str(device),
                    device_name=device_name,
                    torch=torch.__version__,
                    dtype=dtype_name,
                    steps=args.steps,
                    results=results,
                ),
                f,
                indent=2,
            )
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
