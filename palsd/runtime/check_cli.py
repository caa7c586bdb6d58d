"""`palsd check-config FILE`: print every problem with its key, value and rule; exit 2 if any."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from palsd.config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", type=Path, default=DEFAULT_CONFIG_PATH)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as err:
        print(err.report(), file=sys.stderr)
        return 2
    except Exception as err:  # a checker must answer, never crash: one line, still exit 2
        print(f"{args.file}: cannot be checked: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    gpus = "all" if cfg.gpu.indices is None else cfg.gpu.indices
    print(
        f"{args.file}: OK (backend {cfg.gpu.backend}, GPUs {gpus}, "
        f"{len(cfg.servers)} server(s), dry_run {cfg.control.dry_run}, "
        f"controller {cfg.control.controller})"
    )
    return 0
