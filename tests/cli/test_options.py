"""The flags of ``mlray tag`` and ``mlray head`` come from their options dataclasses:
the command line's defaults are the Python API's defaults."""

from __future__ import annotations

import dataclasses
import math

import pytest

from mlray.cli import build_parser
from mlray.tagging.job import TagOptions
from mlray.training.head import HeadOptions


def _cli_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


@pytest.mark.parametrize("cls,argv", [
    (TagOptions, ["tag", "--model", "r", "--input", "i", "--out", "o"]),
    (HeadOptions, ["head", "--model", "r", "--embeddings", "e", "--manifest", "m", "--out", "o"]),
], ids=["tag", "head"])
def test_flag_defaults_are_the_dataclass_defaults(cls, argv):
    args = build_parser().parse_args(argv)
    defaults = cls()
    fields = _cli_fields(cls)
    assert len(fields) >= 7
    for f in fields:
        assert getattr(args, f.name) == getattr(defaults, f.name), f.name
    if cls is TagOptions:
        assert args.precision == defaults.precision  # a flag of its own (shared with evaluate and predict)


def test_flags_parse_to_the_fields_types():
    parser = build_parser()
    args = parser.parse_args(["tag", "--model", "r", "--input", "i", "--out", "o", "--batch-size", "8",
                              "--num-gpus", "1", "--top-k", "2", "--incremental", "--decode", "cpu", "--wait"])
    assert args.batch_size == 8 and isinstance(args.batch_size, int) and args.num_gpus == 1.0
    assert args.top_k == 2 and args.incremental is True and args.decode == "cpu"
    assert math.isinf(args.wait)  # --wait without SECONDS: wait as long as it takes
    assert parser.parse_args(["tag", "--model", "r", "--input", "i", "--out", "o", "--wait", "30"]).wait == 30
    with pytest.raises(SystemExit):
        parser.parse_args(["tag", "--model", "r", "--input", "i", "--out", "o", "--decode", "gpu"])
    head = parser.parse_args(["head", "--model", "r", "--embeddings", "e", "--manifest", "m", "--out", "o",
                              "--epochs", "5", "--device", "cpu", "loss.name=bce"])
    assert head.epochs == 5 and head.device == "cpu" and head.overrides == ["loss.name=bce"]
