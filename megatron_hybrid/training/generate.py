"""`megatron-hybrid-generate`: sample text from a checkpoint.

    megatron-hybrid-generate runs/ckpt --prompt "The " --prompt "Once upon" --max-new-tokens 200
    megatron-hybrid-generate runs/ckpt --ckpt-step 1000 --greedy --device cuda --kernels auto

Any checkpoint of this framework loads, whatever fusion groups or parallel layout it was saved
from (checkpoints are canonical; the model is built from the config it records). The tokenizer
is the one the checkpoint records (training copies its files into every checkpoint); tokenizer
flags name another, and are needed for checkpoints that record none (saved before tokenizers were
recorded, or converted). Prompts are decoded together with state (megatron_hybrid/generation.py);
each row stops after the tokenizer's end-of-document token unless --ignore-eod.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megatron_hybrid.checkpointing import files
from megatron_hybrid.checkpointing.consolidated import DTYPES, model_config_of
from megatron_hybrid.checkpointing.manager import load_checkpoint
from megatron_hybrid.data.tokenizer import (
    Tokenizer,
    TokenizerSettings,
    add_tokenizer_args,
    build_tokenizer,
    recorded_tokenizer_settings,
)
from megatron_hybrid.generation import Sampling, generate
from megatron_hybrid.kernels.cli import KernelSettings, add_kernel_args, kernels_from_settings
from megatron_hybrid.model import HybridModel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-hybrid-generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("checkpoint", help="a save directory (its latest checkpoint) or iter_*")
    parser.add_argument("--ckpt-step", type=int, help="the iteration to load (default: latest)")
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="a prompt (repeatable: all are decoded in one batch); none: one sample started "
        "from the end-of-document token",
    )
    parser.add_argument("--prompt-file", help="a text file: one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--greedy", action="store_true", help="argmax (temperature 0)")
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, help="draw from the k most likely tokens only")
    sampling.add_argument(
        "--top-p", type=float, help="draw from the smallest set of tokens reaching probability p"
    )
    sampling.add_argument("--seed", type=int, default=1234)
    sampling.add_argument(
        "--ignore-eod",
        action="store_true",
        help="keep generating after the end-of-document token (default: a row stops there)",
    )
    run = parser.add_argument_group("model")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="the weights' dtype for decoding (the SSM states stay float32)",
    )
    run.add_argument(
        "--no-verify-checksums",
        action="store_true",
        help="check the files' sizes but not their CRC32s (faster)",
    )
    add_kernel_args(parser)
    tokenizer = parser.add_argument_group("tokenizer (default: the one the checkpoint records)")
    add_tokenizer_args(tokenizer)
    parser.set_defaults(tokenizer_type=None)  # None: the checkpoint's own
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for text in run(args):
            print(text, end="\n\n")
    except ValueError as error:  # CheckpointError, TokenizerError, KernelError: user input
        print(f"megatron-hybrid-generate: error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> list[str]:
    """Each prompt followed by its sample."""
    sampling = Sampling(
        0.0 if args.greedy else args.temperature, args.top_k, args.top_p, seed=args.seed
    )
    directory = files.resolve_checkpoint_dir(args.checkpoint, args.ckpt_step)
    meta = files.read_checkpoint_metadata(directory)
    tokenizer = checkpoint_tokenizer(args, directory, meta)
    device = pick_device(args.device)
    kernels = kernels_from_settings(KernelSettings(args.kernels, args.kernel), device)
    model = load_model(directory, meta, kernels, device, DTYPES[args.dtype], args)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocabulary of {model.config.vocab_size} in {directory}: not the tokenizer "
            "this checkpoint was trained with"
        )
    texts = read_prompts(args)
    prompts = [encode(tokenizer, text) for text in texts]
    stop = None if args.ignore_eod else tokenizer.eod
    samples = generate(
        model, prompts, args.max_new_tokens, sampling, tokenizer.vocab_size, stop_id=stop
    )
    return [
        text + tokenizer.decode(drop_stop(s, stop)) for text, s in zip(texts, samples, strict=True)
    ]


def checkpoint_tokenizer(args: argparse.Namespace, directory: Path, meta: dict) -> Tokenizer:
    """The tokenizer the flags name, else the one `meta` (checkpoint.json) records."""
    if args.tokenizer_type is not None:
        return build_tokenizer(
            TokenizerSettings(
                args.tokenizer_type,
                args.tokenizer_model,
                args.vocab_file,
                args.merge_file,
                args.vocab_size,
            )
        )
    if "tokenizer" not in meta:
        raise ValueError(
            f"{directory / files.METADATA_FILE} records no tokenizer (the checkpoint was saved "
            "before tokenizers were recorded, or converted from another format): name the one "
            "it was trained with, e.g. --tokenizer-type ByteTokenizer, or --tokenizer-type "
            "HuggingFaceTokenizer --tokenizer-model tokenizer.json"
        )
    return build_tokenizer(recorded_tokenizer_settings(meta["tokenizer"], directory))


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def load_model(directory, meta, kernels, device, dtype, args) -> HybridModel:
    """The checkpoint's model, whole, on `device` in `dtype`, through the training loader (its
    files and keys checked first)."""
    config = model_config_of(directory, meta)
    with torch.device("meta"):
        model = HybridModel(config, kernels=kernels)
    model.to_empty(device=device)
    load_checkpoint(directory, model, None, config, verify_checksums=not args.no_verify_checksums)
    model.discard_routing_counts()  # the one non-persistent buffer: zero, not uninitialized
    return model.to(dtype).eval()


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"--prompt-file {args.prompt_file}: {error.strerror}") from None
        prompts += [line for line in text.splitlines() if line]
    return prompts or [""]


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the end-of-document token (the start of a
    document in the training stream)."""
    ids = [int(i) for i in tokenizer.encode(text)] if text else []
    return ids or [tokenizer.eod]


def drop_stop(tokens: torch.Tensor, stop: int | None) -> torch.Tensor:
    return tokens[:-1] if stop is not None and len(tokens) and tokens[-1] == stop else tokens


if __name__ == "__main__":
    sys.exit(main())
