"""Typed config: overrides, errors that name the key, and the job options' ranges."""

from __future__ import annotations

import json

import pytest

from mlray.config import ConfigError, build_config, load_config


def _cfg(manifest, storage_path, name, **over):
    tree = {
        "data": {"manifest": manifest, "image_size": 64, "batch_size": 16, "decode_batch_size": 64},
        "model": {"name": "tf_efficientnet_lite0", "pretrained": "efficientnet-lite0"},
        "optim": {"epochs": 2, "lr": 2e-3, "freeze_epochs": 1, "warmup_epochs": 0.2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": storage_path, "name": name, "max_failures": 2},
    }
    return build_config(tree, [f"{k}={v}" for k, v in over.items()])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key"):
        _cfg("m", "s", "n", **{"optim.lrr": 1})
    with pytest.raises(ConfigError, match=r"optim\.epochs: .*integer.*'ten'"):
        _cfg("m", "s", "n", **{"optim.epochs": "ten"})
    with pytest.raises(ConfigError, match=r"loss\.name: .*'asl'"):
        _cfg("m", "s", "n", **{"loss.name": "hinge"})
    with pytest.raises(ConfigError, match=r"data\.manifest: required"):
        build_config({"data": {}, "run": {"name": "x"}})
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  manifest: m\n  bogus: 1\nrun:\n  name: r\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*\n.*data\.bogus: unknown key"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.epochs"])
    good = _cfg("m", "s", "n", **{"optim.epochs": "5", "scaling.use_gpu": "true"})
    assert good.optim.epochs == 5 and good.scaling.use_gpu is True
    assert json.loads(json.dumps(good.model_dump(mode="json")))["loss"]["name"] == "asl"
