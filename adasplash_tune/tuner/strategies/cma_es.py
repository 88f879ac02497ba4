"""Optuna's CMA-ES over the knobs' choice indices (needs the ``cmaes`` package)."""

from __future__ import annotations

import warnings

from ._base import Strategy

__all__ = ["CmaEsStrategy", "STRATEGY"]


class CmaEsStrategy(Strategy):
    name = "cmaes"

    def sampler(self):
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ValueError("strategy 'cmaes' needs the cmaes package: pip install cmaes") from None
        from optuna.samplers import CmaEsSampler, RandomSampler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CmaEsSampler(seed=self.seed, n_startup_trials=1,
                                independent_sampler=RandomSampler(seed=self.seed),
                                warn_independent_sampling=False, with_margin=True)


STRATEGY = CmaEsStrategy
