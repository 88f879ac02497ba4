"""Fixtures for the tuner tests: isolated caches and study storage, a fake device, table evaluators."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import pytest

from adasplash_tune.cache.store import open_store
from adasplash_tune.tuner.evaluate import TrialResult

#: A GPU fingerprint for tests that never run a kernel (fake evaluators only).
FAKE_GPU = {"backend": "cuda", "vendor": "NVIDIA", "name": "NVIDIA H200", "arch": "sm_90", "sm_count": 132,
            "shared_mem": 232448, "torch_version": "2.11.0", "triton_version": "3.6.0",
            "runtime_version": "12.8", "device_id": "NVIDIA H200|sm_90|triton-3.6"}


@pytest.fixture(autouse=True)
def _isolated(isolated_locations):
    """No test touches the real user cache, shipped caches, record file or fault settings."""


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "cache.sqlite"))
    yield s
    s.close()


@pytest.fixture
def storage_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'studies.sqlite'}"


class TableEvaluator:
    """Stands in for ``Evaluator``: results come from a function of the config (no kernel runs).

    ``table(config) -> (time_ms, error)``; configs for which ``fail(config)`` returns a status
    fail with it. ``compile_fail`` marks configs that fail the parallel compile step.
    """

    def __init__(self, table: Callable[[Mapping[str, Any]], tuple[float, float]], *,
                 fail: Callable[[Mapping[str, Any]], str | None] = lambda c: None,
                 compile_workers: int = 0,
                 compile_fail: Callable[[Mapping[str, Any]], bool] = lambda c: False) -> None:
        self.table, self.fail, self.compile_fail = table, fail, compile_fail
        self.compile_workers = compile_workers
        self.calls: list[dict[str, Any]] = []
        self.requests: list[Any] = []
        self.compiled: list[dict[str, Any]] = []

    def evaluate(self, request) -> TrialResult:
        config = {**request.config, **request.extras}
        self.calls.append(config)
        self.requests.append(request)
        status = self.fail(config)
        if status is not None:
            return TrialResult(status, f"table says {status}")
        time_ms, error = self.table(config)
        return TrialResult("ok", fwd_ms=time_ms, fwd_spread_ms=0.01, error=error,
                           bwd_ms=0.0 if request.backward else None, grad_error=error if request.backward else None)

    def compile(self, requests) -> list[TrialResult]:
        out = []
        for request in requests:
            config = {**request.config, **request.extras}
            self.compiled.append(config)
            out.append(TrialResult("compile", "table compile failure") if self.compile_fail(config)
                       else TrialResult("ok"))
        return out

    def close(self) -> None:
        pass


def log2_bowl(centre: Mapping[str, float], weights: Mapping[str, float] | None = None) -> Callable:
    """A time table with its unique minimum (1.0 ms) at ``centre``: a bowl in log2 of each knob."""
    weights = dict(weights or {})

    def table(config: Mapping[str, Any]) -> tuple[float, float]:
        total = 1.0
        for name, c in centre.items():
            total += weights.get(name, 1.0) * (math.log2(config[name]) - math.log2(c)) ** 2
        return total, 1e-6

    return table
