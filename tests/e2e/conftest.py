"""Fixtures of the end-to-end tests: the example pipeline and the launch components as modules."""

import importlib.util
import os
import sys

import pytest

from tt_testing import REPO


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pipeline():
    """``examples/dlrm_movielens.py`` (the examples are not part of the package)."""
    return _load("examples/dlrm_movielens.py", "dlrm_movielens")


@pytest.fixture(scope="session")
def components():
    """``launch/components.py``."""
    return _load("launch/components.py", "torchrec_tt_launch_components")


def _write_ratings(path, rows, header="userId,movieId,rating,timestamp"):
    lines = [header] + [r if isinstance(r, str) else ",".join(str(x) for x in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def write_ratings():
    """``write_ratings(path, rows, header=...) -> str``: a tiny ratings.csv; rows are tuples or raw lines."""
    return _write_ratings
