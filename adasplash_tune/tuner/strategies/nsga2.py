"""Optuna's NSGA-II for the Pareto mode: minimise (time, error) over the accuracy knobs."""

from __future__ import annotations

from ._base import Strategy

__all__ = ["NSGA2Strategy", "STRATEGY"]


class NSGA2Strategy(Strategy):
    name = "nsga2"
    multi_objective = True

    def sampler(self):
        from optuna.samplers import NSGAIISampler

        population = min(20, max(4, self.budget // 3)) if self.budget else 20
        return NSGAIISampler(population_size=population, seed=self.seed)


STRATEGY = NSGA2Strategy
