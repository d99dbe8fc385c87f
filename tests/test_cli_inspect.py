"""``dyrep-fx inspect MODEL``: the torchvision path of the command line (README: ``dyrep-fx inspect resnet50``).

The sites table is checked against torchvision's own model, counted here independently: one row per
Conv2d, its channels, kernel, stride and output map at the default 224 px input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torchvision
from helpers.launch import ROOT, clean_env
from torch import nn

from dyrep_fx import cli

DYREP_FX = Path(sys.executable).parent / "dyrep-fx"  # the installed console script


def convs(name: str) -> dict[str, nn.Conv2d]:
    model = torchvision.models.get_model(name, weights=None)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_inspect_resnet50_prints_every_conv_with_its_geometry_and_output():
    proc = subprocess.run([str(DYREP_FX), "inspect", "resnet50"], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    expected = convs("resnet50")
    assert lines[0] == f"resnet50: {len(expected)} conv sites, {len(expected)} eligible (online mode)"
    assert lines[1].split()[:3] == ["site", "cin", "cout"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == list(expected)  # every conv, in module order
    for name, conv in expected.items():
        _, cin, cout, k, s, g, output, calls, kinds = rows[name]
        assert (int(cin), int(cout), int(s), int(g)) == (conv.in_channels, conv.out_channels, conv.stride[0],
                                                         conv.groups), name
        assert k == "x".join(map(str, conv.kernel_size)) and calls == "1", name
        assert kinds.split(",")[0] in ("1x1", "1x1_kxk"), name
    assert rows["conv1"][6] == "64x112x112" and rows["layer4.2.conv3"][6] == "2048x7x7"
    assert "identity" in rows["layer1.0.conv2"][8] and "identity" not in rows["layer2.0.conv2"][8]  # stride 2


def test_inspect_json_and_mode_and_size(capsys):
    assert cli.main(["inspect", "mobilenet_v2", "--json", "--size", "64", "--mode", "dbb"]) == 0
    found = json.loads(capsys.readouterr().out)
    expected = convs("mobilenet_v2")
    assert [s["name"] for s in found] == list(expected)
    first = found[0]
    assert first["output_shape"][-2:] == [32, 32] and first["calls"] == 1


def test_inspect_an_unknown_model_fails_naming_it(capsys):
    assert cli.main(["inspect", "resnet_51"]) == 2
    assert "resnet_51" in capsys.readouterr().err
