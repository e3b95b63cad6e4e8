"""The `dsv2` command.

Each area registers its own subcommands from a small `cli` module of its own, imported lazily
so that `dsv2 keys list` never pays for importing torch or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> module providing `add_arguments(parser)` and `run(args) -> int`
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("services.launcher.cli_serve", "run the whole chatbot on this machine"),
    "chat": ("services.launcher.cli_chat", "chat in the terminal through the HTTP API"),
    "generate": ("services.engine.cli", "generate from a checkpoint with the engine (offline)"),
    "gateway": ("services.gateway.cli.gateway", "run the gateway (HTTP + gRPC)"),
    "keys": ("services.gateway.cli.keys", "create, list and revoke API keys"),
    "users": ("services.gateway.cli.users", "manage users (tiers)"),
    "usage": ("services.gateway.cli.usage", "requests, tokens and refusals per user per day"),
    "model-plane": ("services.serving.cli", "run the Ray Serve model plane"),
    "train-demo": ("services.demo.cli", "train the shipped demo model"),
    "k8s": ("services.k8s.cli", "inspect a Kubernetes deployment of dsv2"),
    "capacity": ("services.capacity.cli", "plan replicas and GPUs for a traffic estimate"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv2", description="dsv2-serve: DeepSeek-V2 chat service"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only import the module of the command actually asked for.
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text)
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
