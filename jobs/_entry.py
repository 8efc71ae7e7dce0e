"""Shared by the job entrypoints: run one `mlray` command from a checkout,
whether or not the package is installed on the cluster."""

import sys
from pathlib import Path


def run(command: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mlray.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
