"""`modelgw llm ...`: tools for the LLM runtime.

    modelgw llm make-checkpoint /tmp/tiny                       # 2 layers, hidden 64: tests
    modelgw llm make-checkpoint /tmp/bench --layers 8 --hidden 512 --heads 8 --kv-heads 4
    modelgw llm export-onnx /tmp/tiny /tmp/tiny-step.onnx       # the decoder step, KV cache in/out
    modelgw runtime serve --kind llm --model tiny=/tmp/tiny --port 8001
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    llm = subparsers.add_parser("llm", help="LLM runtime tools (make a small random checkpoint)")
    commands = llm.add_subparsers(dest="llm_command", metavar="COMMAND", required=True)
    make = commands.add_parser(
        "make-checkpoint",
        help="write a small random Llama checkpoint with a trained tokenizer (offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    make.add_argument("directory", type=Path, help="where to write it (created; existing files are overwritten)")
    make.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    make.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    make.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    make.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention; default 2)")
    make.add_argument("--vocab", type=int, default=512, help="vocabulary size (>= 262; default 512)")
    make.add_argument("--intermediate", type=int, default=None, help="MLP size (default 8/3 * hidden)")
    make.add_argument("--max-position", type=int, default=2048, help="context length (default 2048)")
    make.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    make.add_argument("--tie-embeddings", action="store_true", help="share the embedding with the LM head")
    make.set_defaults(func=make_checkpoint_command)
    export = commands.add_parser(
        "export-onnx",
        help="export the decoder's step (prefill and decode, KV cache as inputs/outputs) as one ONNX graph",
        description="Export a checkpoint's decoder step as one ONNX graph (fp32) and check it with "
                    "onnx.checker; runtimes/llm/onnx_export.py describes its inputs and outputs.",
    )
    export.add_argument("checkpoint", type=Path, help="a checkpoint directory (config.json, *.safetensors)")
    export.add_argument("out", type=Path, help="the .onnx file to write (overwritten)")
    export.add_argument("--block-size", type=int, default=16,
                        help="the KV cache's tokens per block, as the engine's block_size (default 16)")
    export.add_argument("--max-len", type=int, default=None,
                        help="longest position served (default: the model's max_position_embeddings)")
    export.set_defaults(func=export_onnx_command)


def make_checkpoint_command(args: argparse.Namespace) -> int:
    from modelgw.runtimes.llm.make_checkpoint import make_checkpoint

    for name in ("layers", "hidden", "heads", "kv_heads", "max_position"):
        if getattr(args, name) < 1:
            print(f"modelgw llm: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        path = make_checkpoint(
            args.directory, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
            vocab=args.vocab, intermediate=args.intermediate, max_position=args.max_position, seed=args.seed,
            tie_embeddings=args.tie_embeddings,
        )
    except (ValueError, OSError) as exc:
        print(f"modelgw llm: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a random Llama checkpoint to {path}")
    return 0


def export_onnx_command(args: argparse.Namespace) -> int:
    from modelgw.runtimes.errors import ModelLoadError
    from modelgw.runtimes.llm.checkpoint import Checkpoint
    from modelgw.runtimes.llm.onnx_export import export_onnx

    for name in ("block_size", "max_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"modelgw llm: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        path = export_onnx(Checkpoint.open(args.checkpoint), args.out, block_size=args.block_size,
                           max_len=args.max_len)
    except (ModelLoadError, ValueError, OSError) as exc:
        print(f"modelgw llm: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the decoder step graph of {args.checkpoint} to {path} (onnx.checker: ok)")
    return 0
