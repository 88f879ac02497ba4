"""Shared test setup.

Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors: TRITON_INTERPRET
must be set before any kernel module is imported, so it is set here, first. GPU tests carry the
``gpu`` marker (run them with ``pytest -m gpu`` on a CUDA machine); tests needing a PostgreSQL
server carry the ``postgres`` marker and run when ADASPLASH_TUNE_TEST_POSTGRES_URL is set.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Tests never read or write a developer's own tuned configs: a private user cache per session.
_SESSION_DIR = tempfile.mkdtemp(prefix="adasplash-tune-tests-")
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)
os.environ["ADASPLASH_TUNE_CACHE"] = os.path.join(_SESSION_DIR, "configs.sqlite")
os.environ.pop("ADASPLASH_TUNE_RECORD", None)
os.environ.pop("ADASPLASH_TUNE_MODE", None)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: Where Triton-backend tests put their tensors: the GPU if present, else CPU (interpreter).
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    # Tests marked `postgres` need a server (ADASPLASH_TUNE_TEST_POSTGRES_URL; CI starts one):
    # without it they are deselected (reported as such), not skipped.
    if not os.environ.get("ADASPLASH_TUNE_TEST_POSTGRES_URL"):
        deselected = [item for item in items if item.get_closest_marker("postgres")]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker("postgres")]
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_selection_memo():
    """Each test starts with an empty call-time selection memo."""
    from adasplash_tune.api import clear_memo

    clear_memo()
    yield
    clear_memo()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny inputs (fastest, and immune to a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def isolated_locations(tmp_path, monkeypatch):
    """This test's own user cache and an empty shipped folder; no record file, mode or fault
    settings from the environment. Returns the shipped folder."""
    from adasplash_tune.cache import locations

    monkeypatch.setenv(locations.ENV_CACHE, str(tmp_path / "user-cache.sqlite"))
    for name in (locations.ENV_SHIPPED, "ADASPLASH_TUNE_RECORD", "ADASPLASH_TUNE_RECORD_SAMPLES",
                 "ADASPLASH_TUNE_RECORD_SAMPLE_MB", "ADASPLASH_TUNE_MODE", "ADASPLASH_TUNE_FAULT"):
        monkeypatch.delenv(name, raising=False)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(locations, "SHIPPED_DIR", shipped)
    return shipped


@pytest.fixture
def triton_device() -> str:
    return TRITON_DEVICE
