"""Where images are decoded: ``--decode auto`` resolved per job and per device."""

from __future__ import annotations


def test_decode_auto_without_a_gpu_decodes_in_the_scoring_actor_but_not_in_the_trainer():
    from mlray.model.device_decode import resolve_mode

    assert resolve_mode("auto", 0, "tag") == "device" and resolve_mode("auto", 0, "train") == "cpu"
    assert resolve_mode("auto", 1, "tag") == resolve_mode("auto", 1, "train") == "device"
    assert resolve_mode("cpu", 1, "tag") == "cpu"
