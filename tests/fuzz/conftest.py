"""Tallies of the bad-input fuzz (``test_fuzz.py``) and its one-line summary in the CI output.

The summary is written by ``pytest_terminal_summary`` through the terminal reporter, so it is
printed with or without ``-s``::

    fuzz: 150 cases (op 60, module 50, config 40): 71 equal to the reference, 79 clear ValueError; 0 silently wrong, 0 vague, 0 crashes
"""

from collections import Counter

import pytest

FUZZ_STATS: Counter = Counter()


@pytest.fixture(scope="session")
def fuzz_stats() -> Counter:
    return FUZZ_STATS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    s = FUZZ_STATS
    if not s["cases"]:
        return
    terminalreporter.write_line(
        f"fuzz: {s['cases']} cases (op {s['op']}, module {s['module']}, config {s['config']}): "
        f"{s['equal']} equal to the reference, {s['rejected']} clear ValueError; "
        f"{s['silently wrong']} silently wrong, {s['vague']} vague, {s['crashes']} crashes"
    )
