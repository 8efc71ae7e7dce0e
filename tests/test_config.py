"""Typed config: overrides, errors that name the key, and the job options' ranges."""

from __future__ import annotations

import dataclasses
import json

import pytest

from configs import small_run_config
from mlray.config import ConfigError, build_config, check_options, load_config, option, option_flag



def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key"):
        small_run_config("m", "s", "n", **{"optim.lrr": 1})
    with pytest.raises(ConfigError, match=r"optim\.epochs: .*integer.*'ten'"):
        small_run_config("m", "s", "n", **{"optim.epochs": "ten"})
    with pytest.raises(ConfigError, match=r"loss\.name: .*'asl'"):
        small_run_config("m", "s", "n", **{"loss.name": "hinge"})
    with pytest.raises(ConfigError, match=r"data\.manifest: required"):
        build_config({"data": {}, "run": {"name": "x"}})
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  manifest: m\n  bogus: 1\nrun:\n  name: r\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*\n.*data\.bogus: unknown key"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.epochs"])
    good = small_run_config("m", "s", "n", **{"optim.epochs": "5", "scaling.use_gpu": "true"})
    assert good.optim.epochs == 5 and good.scaling.use_gpu is True
    assert json.loads(json.dumps(good.model_dump(mode="json")))["loss"]["name"] == "asl"


def test_overrides_are_typed_nested_and_leave_the_tree_alone():
    tree = {"data": {"manifest": "m"}, "run": {"name": "r"}}
    cfg = build_config(tree, ["optim.lr=1e-3", "optim.unfreeze_stages=null", "data.augment.hflip=0",
                              "run.storage_path=s3://b/runs=a", "model.name=resnet18", "scaling.use_gpu=yes"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.unfreeze_stages is None and cfg.data.augment.hflip == 0
    assert cfg.run.storage_path == "s3://b/runs=a"  # split at the first '=' only
    assert cfg.model.name == "resnet18" and cfg.scaling.use_gpu is True
    assert tree == {"data": {"manifest": "m"}, "run": {"name": "r"}}  # the caller's tree is not changed
    with pytest.raises(ConfigError, match=r"override 'data\.manifest\.x': 'manifest' is a value, not a section"):
        build_config(tree, ["data.manifest.x=1"])
    with pytest.raises(ConfigError, match=r"optim\.freeze_epochs \(3\) must be below optim\.epochs \(3\)"):
        build_config(tree, ["optim.epochs=3", "optim.freeze_epochs=3"])


def test_a_config_file_that_is_not_a_mapping_names_the_file(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- data\n- run\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_config(str(p))
    p = tmp_path / "broken.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(str(p))


@dataclasses.dataclass
class _Options:
    size: int = option(8, "rows", low=1, integer=True)
    rate: float = option(0.5, "a share", low=0)
    mode: str = option("fast", "how", choices=("fast", "slow"))
    limit: float | None = option(None, "an optional limit", low=1, type=float)
    names: list[str] = option([], "names", cli=False, flag="--name")


def test_options_carry_their_flag_and_range_and_the_error_names_the_flag():
    check_options(_Options())  # the defaults are in range
    check_options(_Options(limit=None, size=3))  # None: not set, not checked
    cases = [
        (_Options(size=0), "--size 0: must be an integer >= 1"),
        (_Options(size=2.5), "--size 2.5: must be an integer >= 1"),
        (_Options(rate=-0.1), "--rate -0.1: must be >= 0"),
        (_Options(mode="medium"), "--mode medium: choose one of fast, slow"),
        (_Options(limit=0.5), "--limit 0.5: must be >= 1"),
    ]
    for opts, message in cases:
        with pytest.raises(ConfigError) as e:
            check_options(opts)
        assert str(e.value) == message
    with pytest.raises(KeyError, match="--size 0"):
        check_options(_Options(size=0), KeyError)  # a job's own error type
    fields = {f.name: f for f in dataclasses.fields(_Options)}
    assert option_flag(fields["limit"]) == "--limit" and option_flag(fields["names"]) == "--name"
    a, b = _Options(), _Options()
    a.names.append("x")
    assert b.names == []  # a list default is a fresh list per instance
