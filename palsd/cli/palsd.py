"""`palsd` entry point: one subcommand per module, imported only when chosen.

Each module named here exposes `add_arguments(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("palsd.runtime.run_cli", "run the daemon"),
    "check-config": ("palsd.runtime.check_cli", "validate a config file and print every problem"),
    "demo": ("palsd.runtime.demo", "start a simulated host and palsd, and show live status"),
    "sim-host": ("palsd.sim.host_cli", "run a simulated GPU host with vLLM-like servers"),
    "simulate": ("palsd.sim.simulate_cli", "compare policies on the twin in virtual time"),
    "twin": ("palsd.sim.twin_cli", "the twin's physics: `twin step` (one step under a limit)"),
    "probe-vllm": ("palsd.sense.probe_cli", "scrape a vLLM server twice and print its signals"),
    "restore": ("palsd.act.restore_cli", "put back the power and batch limits palsd changed"),
    "sign-budget": ("palsd.feed.sign_cli", "print a signed MQTT budget or price message"),
    "coordinator": ("palsd.fleet.cli", "run the fleet coordinator of one group (docs/fleet.md)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palsd", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = sys.argv[1] if len(sys.argv) > 1 else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = build_parser().parse_args()
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
