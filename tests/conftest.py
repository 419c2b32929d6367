"""Shared pytest setup for the torchrec_tt tests.

Test helpers live in ``tests/tt_testing.py`` (a plain module, not fixtures, so that
hypothesis tests can use them); this file puts ``tests/`` on ``sys.path`` for any
pytest import mode and registers the hypothesis defaults.

``TORCHREC_TT_DISABLE_EXTENSION=1`` hides ``torchrec_tt._C`` from the import system,
so the same tests run on the pure-PyTorch ops even where the extension is built.
"""

import importlib.abc
import os
import sys

from hypothesis import HealthCheck, settings


class _HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchrec_tt._C":
            raise ImportError("torchrec_tt._C hidden by TORCHREC_TT_DISABLE_EXTENSION=1")
        return None


if os.environ.get("TORCHREC_TT_DISABLE_EXTENSION", "0") == "1":
    assert "torchrec_tt" not in sys.modules, "conftest: torchrec_tt was imported before the extension could be hidden"
    sys.meta_path.insert(0, _HideExtension())

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# Defaults for every hypothesis test (each test still sets its own small max_examples).
settings.register_profile("torchrec_tt", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile("torchrec_tt")
