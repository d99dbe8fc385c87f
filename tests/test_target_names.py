"""Names across a model's targets (:mod:`dyrep_fx.target_names`)."""

import pytest

from dyrep_fx.target_names import join_name, split_name


def test_join_name_prefixes_a_target_name_and_leaves_the_whole_model_alone():
    assert join_name("backbone", "layer1.0.conv1") == "backbone.layer1.0.conv1"
    assert join_name("", "features.3") == "features.3"


def test_split_name_takes_the_innermost_target():
    prefixes = ["backbone", "backbone.layer1", "neck"]
    assert split_name(prefixes, "backbone.layer1.0.conv1") == ("backbone.layer1", "0.conv1")
    assert split_name(prefixes, "backbone.conv1") == ("backbone", "conv1")
    assert split_name(["", "head"], "head.cls") == ("head", "cls")
    assert split_name([""], "features.3") == ("", "features.3")


def test_split_name_does_not_match_a_prefix_of_a_longer_module_name():
    assert split_name(["neck", ""], "necklace.conv") == ("", "necklace.conv")


def test_split_name_names_the_name_and_the_targets_when_it_fits_none():
    with pytest.raises(KeyError, match=r"'head.cls'.*\['backbone', 'neck'\]"):
        split_name(iter(["backbone", "neck"]), "head.cls")
