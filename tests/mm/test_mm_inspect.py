"""``dyrep-fx inspect CONFIG``: the sites table of an OpenMMLab config's DyRep targets.

The model is built from the config without weights, its targets' inputs are captured on one tensor-mode
forward of a dummy image (the heads included, which mmdet and mmseg call as ``head.forward(x)``), and each
target is transformed with them: shapes and per-forward call counts are known.
"""

from __future__ import annotations

import json

import pytest

from dyrep_fx import cli

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")
pytestmark = pytest.mark.usefixtures("one_thread")

RETINANET = "mm_configs/cpu/retinanet_r18_fpn_deepforest_dyrep.py"
FCN = "mm_configs/cpu/fcn_r18_fashion_seg_dyrep.py"


def inspect(capsys, *args: str) -> str:
    assert cli.main(["inspect", *args]) == 0
    return capsys.readouterr().out


def rows(out: str, prefix: str) -> list[list[str]]:
    """The table rows of sites whose name starts with ``prefix``, split on whitespace."""
    return [line.split() for line in out.splitlines() if line.startswith(prefix)]


def test_retinanet_config_shows_every_target_and_the_shared_head_convs(capsys):
    out = inspect(capsys, RETINANET, "--size", "128", "--cfg-options", "model.backbone.frozen_stages=1")
    assert "RetinaNet, DyRep targets backbone, neck, bbox_head (online mode), dummy input 1x3x128x128" in out
    assert [line for line in out.splitlines() if line.startswith("[")] == [
        "[backbone] 20 conv sites, 15 eligible", "[neck] 8 conv sites, 8 eligible",
        "[bbox_head] 6 conv sites, 6 eligible"]
    assert out.count("kinds / reason") == 3
    head = rows(out, "bbox_head.")
    assert {r[0] for r in head} == {"bbox_head.cls_convs.0.conv", "bbox_head.cls_convs.1.conv",
                                    "bbox_head.reg_convs.0.conv", "bbox_head.reg_convs.1.conv",
                                    "bbox_head.retina_cls", "bbox_head.retina_reg"}
    # name cin cout k s g output calls kinds: each conv serves the 5 pyramid levels; the first is 16x16
    assert all(r[7] == "5" and r[6].endswith("x16x16") and "NOT" not in r[8] for r in head), head
    frozen = rows(out, "backbone.layer1.0.conv1")[0]
    assert frozen[8:10] == ["NOT", "ELIGIBLE:"] and "frozen" in " ".join(frozen[10:])


def test_fcn_config_and_json(capsys):
    found = json.loads(inspect(capsys, FCN, "--json"))
    assert found["model_type"] == "EncoderDecoder" and found["hook_found"] and found["mode"] == "online"
    assert found["image_size"] == [128, 128]  # the config's crop size
    (backbone,) = found["per_target"]
    assert backbone["target"] == "backbone" and backbone["input_shapes"] == [[1, 3, 128, 128]]
    assert len(backbone["sites"]) == 22 and all(s["eligible"] and s["calls"] == 1 for s in backbone["sites"])
    # the decode head (called as decode_head.forward(x)) is reached; the auxiliary head is not in tensor mode
    out = inspect(capsys, FCN, "--targets", "decode_head,auxiliary_head")
    assert rows(out, "decode_head.convs.0.conv")[0][6] == "128x8x8"
    assert "not reached" not in out and "tensor-mode forward does not run it" in out.split("[auxiliary_head]")[1]


def test_config_without_dyrep_hook_defaults_to_the_backbone(capsys):
    out = inspect(capsys, "mm_configs/cpu/retinanet_r18_fpn_deepforest.py", "--size", "64")
    assert "no DyRepHook in custom_hooks: showing DyRepHook's default targets ['backbone']" in out
    assert "[backbone] 20 conv sites" in out and "[neck]" not in out


def test_torchvision_only_options_are_refused_for_model_names(capsys):
    assert cli.main(["inspect", "resnet18", "--targets", "backbone"]) == 2
    assert "apply to OpenMMLab configs only" in capsys.readouterr().err
