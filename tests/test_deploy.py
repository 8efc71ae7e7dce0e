"""The shipped install paths (Dockerfile, cluster.yaml, rayjob.yaml) install the torch
build the project pins: versions from constraints.txt, CUDA build from one index.

PyPI's default torch is a CUDA 13 build that needs NVIDIA driver >= 580; on older
nodes training fails at NCCL init and tagging scores on CPU. These checks keep the
image and the cluster launcher on the same pinned versions and the same CUDA 12 index."""

from __future__ import annotations

import os
import re
import shlex

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def _dockerfile() -> tuple[list[str], dict[str, str], str]:
    """RUN commands (continuations joined, ARG defaults substituted), ARG defaults, base image."""
    text = re.sub(r"\\\n", " ", _read("Dockerfile"))
    args, runs, base = {}, [], ""
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        elif word == "FROM":
            base = rest.split()[0]
        elif word == "RUN":
            runs.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest))
    return runs, args, base


def _pip_installs(commands: list[str]) -> list[list[str]]:
    out = []
    for command in commands:
        for part in re.split(r"&&|;|\|\|", command):
            words = shlex.split(part)
            if "pip" in [os.path.basename(w) for w in words] and "install" in words:
                out.append(words)
    return out


def _option(words: list[str], *names: str) -> list[str]:
    values = []
    for i, w in enumerate(words):
        for n in names:
            if w == n and i + 1 < len(words):
                values.append(words[i + 1])
            elif w.startswith(n + "="):
                values.append(w.split("=", 1)[1])
    return values


def _cluster_commands(doc: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    cmds = [c for k in keys for c in doc.get(k) or []]
    for node in (doc.get("available_node_types") or {}).values():
        cmds += [c for k in keys for c in node.get(k) or []]
    return cmds


def test_every_shipped_pip_install_uses_the_constraints_and_one_cuda12_torch_index():
    runs, args, base = _dockerfile()
    cluster = yaml.safe_load(_read("cluster.yaml"))
    installs = {"Dockerfile": _pip_installs(runs), "cluster.yaml": _pip_installs(_cluster_commands(cluster))}
    assert installs["Dockerfile"] and installs["cluster.yaml"], "no pip install found where mlray is installed"
    indexes = set()
    for where, cmds in installs.items():
        for words in cmds:
            constraints = _option(words, "-c", "--constraint")
            assert constraints and all(c.endswith("constraints.txt") for c in constraints), (
                f"{where}: {' '.join(words)!r} installs without -c constraints.txt (PyPI's newest torch needs driver >= 580)")
            found = _option(words, "--extra-index-url", "--index-url")
            assert found, f"{where}: {' '.join(words)!r} names no PyTorch index: PyPI's default torch is a CUDA 13 build"
            indexes.update(found)
    # one CUDA 12 build everywhere: runs on drivers >= 525 (minor-version compatibility)
    assert len(indexes) == 1, f"the Dockerfile and cluster.yaml install torch from different indexes: {indexes}"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", indexes.pop())
    # the versions live in constraints.txt alone, pinned exactly
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", _read("constraints.txt"), re.M))
    assert set(pins) == {"torch", "torchvision"}
    for text in (_read("Dockerfile"), _read("cluster.yaml")):
        assert not re.search(r"torch(vision)?==", text)
    # the image and the cluster launcher start from the same Ray image
    assert cluster["docker"]["image"] == base


def test_rayjob_runs_the_dockerfile_image_and_installs_nothing_else():
    job = yaml.safe_load(_read("rayjob.yaml"))
    tag = re.search(r"docker build -t (\S+) \.", _read("Dockerfile")).group(1)
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {tag}, f"rayjob.yaml runs {images}, not the image the Dockerfile builds ({tag})"
    assert spec["rayVersion"] == re.search(r"rayproject/ray:([\d.]+)-", _dockerfile()[2]).group(1)
    runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}") or {}
    assert not {"pip", "uv", "conda"} & set(runtime_env), "a runtime_env package list would bypass constraints.txt"
    assert "pip install" not in job["spec"]["entrypoint"]
