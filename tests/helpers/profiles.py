"""Hypothesis profiles of the suite, and the example budget each property test scales by.

* ``ci``: derandomized (the same examples on every run, so a failure in CI reproduces and a pass means
  the same thing twice); no example database. Selected when ``CI`` is set and by ``scripts/run_tests.sh``.
* ``explore``: random examples, 10x each test's budget, failures kept in ``.hypothesis/`` so they replay;
  ``make explore`` runs the property tests under it.

Without either, hypothesis's own default profile applies (random examples, each test's budget).
"""

from __future__ import annotations

import os

from hypothesis import settings

#: The profile ``DYREP_FX_HYPOTHESIS_PROFILE`` names, else ``ci`` when the ``CI`` variable is set.
PROFILE_ENV = "DYREP_FX_HYPOTHESIS_PROFILE"
#: Hypothesis's default ``max_examples``: a profile's value relative to it scales every test's budget.
BASE_EXAMPLES = 100
EXPLORE_FACTOR = 10


def register_profiles() -> None:
    """Register ``ci`` and ``explore`` and load the one the environment selects (``--hypothesis-profile``
    on the pytest command line still wins: the plugin loads it later)."""
    settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    settings.register_profile("explore", max_examples=BASE_EXAMPLES * EXPLORE_FACTOR, derandomize=False,
                              print_blob=True)
    chosen = os.environ.get(PROFILE_ENV) or ("ci" if os.environ.get("CI") else None)
    if chosen:
        settings.load_profile(chosen)


def examples(n: int) -> int:
    """A property test's budget of ``n`` examples under the loaded profile (``explore``: 10 n).

    Tests set their own ``max_examples`` (their cost differs by orders of magnitude), which a profile's
    ``max_examples`` alone would not override; scaling here lets one profile run all of them longer.
    """
    return max(1, n * settings.default.max_examples // BASE_EXAMPLES)
