"""The hypothesis profiles of tests/helpers/profiles.py: ``ci`` repeats its examples, ``explore`` scales
every property test's budget."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from helpers.profiles import EXPLORE_FACTOR, examples
from hypothesis import given, settings
from hypothesis import strategies as st


@contextlib.contextmanager
def settings_profile(name: str) -> Iterator[None]:
    """Load the registered profile ``name`` for the block, then the one loaded before."""
    saved = settings.get_current_profile_name()
    settings.load_profile(name)
    try:
        yield
    finally:
        settings.load_profile(saved)


def draws_of_one_run() -> list[int]:
    """The values one run of a small property test draws (under the loaded profile)."""
    seen: list[int] = []

    @settings(max_examples=examples(10), database=None)
    @given(st.integers(0, 10**9))
    def probe(value: int) -> None:
        seen.append(value)

    probe()
    return seen


def test_the_ci_profile_draws_the_same_examples_every_run():
    with settings_profile("ci"):
        first, second = draws_of_one_run(), draws_of_one_run()
    assert first == second and len(set(first)) > 1


def test_the_explore_profile_scales_each_tests_budget():
    with settings_profile("explore"):
        assert examples(20) == 20 * EXPLORE_FACTOR
        assert settings.default.derandomize is False
    with settings_profile("ci"):
        assert examples(20) == 20 and settings.default.derandomize
