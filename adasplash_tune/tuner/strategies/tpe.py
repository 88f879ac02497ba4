"""Optuna's Tree-structured Parzen Estimator (the default strategy)."""

from __future__ import annotations

import warnings

from ._base import Strategy

__all__ = ["TPEStrategy", "STRATEGY"]


class TPEStrategy(Strategy):
    name = "tpe"

    def sampler(self):
        from optuna.samplers import TPESampler

        startup = min(10, max(3, self.budget // 4)) if self.budget else 10
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # multivariate TPE is flagged experimental
            return TPESampler(seed=self.seed, n_startup_trials=startup, multivariate=True,
                              constant_liar=True, warn_independent_sampling=False)


STRATEGY = TPEStrategy
