"""The `modelgw` command. Each component owns its subcommands in its own `cli` module,
exposing `register(subparsers)`; this module only wires them together, importing each
lazily so that `modelgw get models` never pays for importing torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module path -> the subcommands it registers (used to import only what is needed)
COMPONENTS: dict[str, tuple[str, ...]] = {
    "modelgw.runtimes.cli": ("runtime",),
    "modelgw.registry.cli": ("apply", "get", "delete", "registry"),
    "modelgw.gateway.cli": ("gateway",),
    "modelgw.gateway.auth.cli": ("token",),
    "modelgw.reconciler.cli": ("reconcile",),
    "modelgw.runtimes.llm.cli": ("llm",),
    "modelgw.pipelines.cli": ("job", "stream"),
    "modelgw.up": ("up",),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelgw", description="A gRPC multi-runtime model gateway with an etcd-backed registry."
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module, commands in COMPONENTS.items():
        if only is None or only in commands:
            importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    known = {c for cs in COMPONENTS.values() for c in cs}
    parser = build_parser(command if command in known else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code or 0)
