"""`megatron-hybrid-convert` / scripts/convert_checkpoint.py: inspect and convert checkpoints.

    megatron-hybrid-convert inspect CKPT
    megatron-hybrid-convert to-safetensors CKPT OUT.safetensors [--dtype bf16]
    megatron-hybrid-convert from-safetensors IN.safetensors SAVE_DIR
    megatron-hybrid-convert to-hf CKPT OUT_DIR [--dtype bf16]
    megatron-hybrid-convert from-hf HF_DIR SAVE_DIR      (keeps HF_DIR's tokenizer.json, if any)
    megatron-hybrid-convert to-megatron CKPT SAVE_DIR [--layer-spec te|local]
                                                      [--tensor-parallel-size N] [--dtype bf16]
    megatron-hybrid-convert from-megatron MEGATRON_DIR SAVE_DIR

CKPT is a save directory (its latest checkpoint; --iteration picks another) or an iter_* dir.
Checkpoints record their model config, so no model flags are needed. to-safetensors, to-hf and
to-megatron verify every file's CRC32 first; --no-verify-checksums skips that for the shards.
MEGATRON_DIR is a Megatron-LM save directory (or iter_* dir) of a torch_dist checkpoint; its
saved args give the model config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_hybrid.checkpointing import consolidated, files
from megatron_hybrid.checkpointing.manager import tokenizer_attachment
from megatron_hybrid.data.tokenizer import TokenizerSettings
from megatron_hybrid.specs.base import MEGATRON_LAYER_SPECS


def inspect_checkpoint(path, iteration=None, out=None) -> None:
    out = out or sys.stdout
    directory = files.resolve_checkpoint_dir(path, iteration)
    meta = files.read_checkpoint_metadata(directory)
    index_only = {
        name: entry for name, entry in meta["files"].items() if name == files.TENSOR_INDEX_FILE
    }  # inspect reads no shard
    files.verify_manifest(directory, index_only)
    tensors = files.read_tensor_index(directory).state_dict_metadata
    size = sum(info["size"] for info in meta["files"].values())
    print(f"checkpoint   {directory}", file=out)
    print(
        f"iteration    {meta['iteration']}  (consumed samples "
        f"{meta.get('consumed_train_samples', 0)})",
        file=out,
    )
    print(f"pattern      {meta['pattern']}", file=out)
    print(f"contents     {', '.join(meta.get('contents', []))}", file=out)
    print(
        f"files        {len(meta.get('files', {}))}, {size / 2**20:.1f} MiB; saved "
        f"{meta.get('saved_at', '?')} with torch {meta.get('torch_version', '?')}",
        file=out,
    )
    print("model config " + json.dumps(meta["model_config"], sort_keys=True), file=out)
    model_keys = {
        k[len("model.") :]: v
        for k, v in tensors.items()
        if k.startswith("model.") and hasattr(v, "size")
    }
    numel = sum(_numel(v.size) for v in model_keys.values())
    print(f"model tensors ({len(model_keys)}, {numel / 1e6:.2f}M elements):", file=out)
    width = max(map(len, model_keys), default=0)
    for key in sorted(model_keys, key=_natural):
        info = model_keys[key]
        dtype = str(info.properties.dtype).replace("torch.", "")
        print(f"  {key:<{width}}  {str(tuple(info.size)):<18} {dtype}", file=out)
    others = {}
    for key in tensors:
        part = key.split(".", 1)[0]
        if part != "model":
            others[part] = others.get(part, 0) + 1
    for part, count in sorted(others.items()):
        print(f"{part}: {count} entries", file=out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-hybrid-convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="iteration, pattern, config, keys, shapes, dtypes")
    p.add_argument("checkpoint")
    p.add_argument("--iteration", type=int)
    for name, what in (
        ("to-safetensors", "one consolidated safetensors file"),
        ("to-hf", "a Hugging Face nemotron_h directory"),
        ("to-megatron", "a Megatron-Core torch_dist checkpoint (Megatron-LM's --load)"),
    ):
        p = sub.add_parser(name, help=f"checkpoint -> {what}")
        p.add_argument("checkpoint")
        p.add_argument("output")
        p.add_argument("--iteration", type=int)
        p.add_argument(
            "--dtype",
            choices=sorted(consolidated.DTYPES),
            help="cast floating tensors (default: as saved)",
        )
        p.add_argument(
            "--no-verify-checksums",
            action="store_true",
            help="check the files' sizes but not their CRC32s (faster); a damaged "
            "file that stops the read is then checked and named",
        )
        if name == "to-megatron":
            p.add_argument(
                "--layer-spec",
                choices=MEGATRON_LAYER_SPECS,
                default="te",
                help="key names of Megatron-Core's Transformer Engine layer spec (te, the one "
                "Megatron-LM's hybrid models use) or of its local modules (local)",
            )
            p.add_argument(
                "--tensor-parallel-size",
                type=int,
                default=1,
                help="the tensor-parallel size recorded in the args, and the chunking of the "
                "tensors (any size loads it: Megatron-Core reshards)",
            )
    for name, what in (
        ("from-safetensors", "a consolidated safetensors file"),
        ("from-hf", "a Hugging Face nemotron_h directory"),
    ):
        p = sub.add_parser(name, help=f"{what} -> a model-only checkpoint (use with --load)")
        p.add_argument("input")
        p.add_argument("save_dir")
        p.add_argument(
            "--iteration", type=int, default=0, help="iteration number to file it under (default 0)"
        )
    p = sub.add_parser(
        "from-megatron",
        help="a Megatron-Core torch_dist checkpoint -> a checkpoint of ours at its iteration "
        "(model, optimizer when its layout maps, progress)",
    )
    p.add_argument("input")
    p.add_argument("save_dir")
    p.add_argument("--iteration", type=int, help="the Megatron iteration to read (default: latest)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--inspect"]:  # `--inspect DIR` reads like the other tools' flags
        argv[0] = "inspect"
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as error:  # CheckpointError, HFExportError, ConfigError: user input
        print(f"megatron-hybrid-convert: error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    if args.command == "inspect":
        inspect_checkpoint(args.checkpoint, args.iteration)
        return
    if args.command == "from-megatron":
        from megatron_hybrid.checkpointing.megatron_core.load import (
            read_megatron_state,
            save_as_ours,
        )

        state = read_megatron_state(args.input, args.iteration)
        for note in state.notes:
            print(f"warning: {note}", file=sys.stderr)
        save_as_ours(state, args.save_dir, log=lambda _: None)
        print(f"wrote {args.save_dir} from {state.directory} ({len(state.model)} tensors)")
        return
    if args.command in ("to-safetensors", "to-hf", "to-megatron"):
        state, config, meta = consolidated.read_model_state(
            args.checkpoint, args.iteration, verify_checksums=not args.no_verify_checksums
        )
        dtype = consolidated.DTYPES.get(args.dtype)
        if args.command == "to-safetensors":
            consolidated.save_safetensors(args.output, state, config, dtype)
        elif args.command == "to-megatron":
            from megatron_hybrid.checkpointing.megatron_core import save_megatron_checkpoint

            save_megatron_checkpoint(
                args.output,
                state,
                config,
                iteration=meta["iteration"],
                consumed_train_samples=meta.get("consumed_train_samples", 0),
                layer_spec=args.layer_spec,
                tensor_parallel=args.tensor_parallel_size,
                dtype=dtype,
            )
            print(
                "note: optimizer and RNG states are not written; in Megatron-LM load with "
                "--finetune, or --no-load-optim to continue at this iteration",
                file=sys.stderr,
            )
        else:
            from megatron_hybrid.checkpointing.hf_nemotron_h import save_hf_checkpoint

            save_hf_checkpoint(args.output, state, config, dtype=dtype)
            print(export_tokenizer(args, meta))
        print(f"wrote {args.output} from iteration {meta['iteration']} ({len(state)} tensors)")
        return
    attachment = None
    if args.command == "from-safetensors":
        state, config = consolidated.load_safetensors(args.input)
    else:
        from megatron_hybrid.checkpointing.hf_nemotron_h import load_hf_checkpoint

        state, config = load_hf_checkpoint(args.input)
        if (Path(args.input) / "tokenizer.json").is_file():  # the model's tokenizer, kept
            settings = TokenizerSettings("HuggingFaceTokenizer", tokenizer_model=args.input)
            attachment = tokenizer_attachment(settings)
    consolidated.write_model_checkpoint(
        args.save_dir, state, config, args.iteration, attachment=attachment
    )


def _numel(size) -> int:
    n = 1
    for d in size:
        n *= d
    return n


def _natural(key: str):
    return [int(part) if part.isdigit() else part for part in key.split(".")]


if __name__ == "__main__":
    sys.exit(main())


def export_tokenizer(args: argparse.Namespace, meta: dict) -> str:
    """Write the tokenizer the checkpoint records beside the exported weights (so
    AutoTokenizer.from_pretrained reads the export); returns a line for the output."""
    from megatron_hybrid.checkpointing.hf_tokenizer import write_hf_tokenizer
    from megatron_hybrid.data.tokenizer import build_tokenizer, recorded_tokenizer_settings

    if "tokenizer" not in meta:
        return (
            "note: the checkpoint records no tokenizer (saved before checkpoints recorded "
            "one): no tokenizer.json written"
        )
    directory = files.resolve_checkpoint_dir(args.checkpoint, args.iteration)
    tokenizer = build_tokenizer(recorded_tokenizer_settings(meta["tokenizer"], directory))
    return write_hf_tokenizer(tokenizer, Path(args.output), max_length=None)
