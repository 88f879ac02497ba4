"""Strategies on synthetic timing tables (no GPU): each finds the known optimum."""

from __future__ import annotations


import optuna
import pytest

from adasplash_tune.tuner.outcome import Outcome
from adasplash_tune.tuner.search import FAILURE_PENALTY, StageSearch
from adasplash_tune.tuner.space import build_space
from adasplash_tune.tuner.strategies import STRATEGIES, get_strategy

from .conftest import log2_bowl

optuna.logging.set_verbosity(optuna.logging.WARNING)

CENTRE = {"block_n": 1024, "rows": 2, "num_warps": 4, "num_stages": 2}


def _space():
    """72 valid points of the entmax Triton declaration (one value per accuracy knob: accuracy is
    not at stake here)."""
    return build_space("entmax", "triton", target="cuda").restrict(
        {"block_n": (256, 512, 1024, 2048), "rows": (1, 2, 4), "num_warps": (2, 4, 8),
         "num_stages": (1, 2), "niter": (10,), "tau_tol": ("auto",), "tau_init": ("subset",)})


def _run(name: str, budget: int, table, seed: int = 7, storage=None):
    space = _space()
    free = space.free_names(space.names)
    cls = get_strategy(name)
    strategy = cls(space, free, space.default_values(), seed=seed, budget=budget)
    study = optuna.create_study(sampler=strategy.sampler(), storage=storage,
                                directions=["minimize"] * (2 if cls.multi_objective else 1))
    seen = []

    def evaluate(values):
        assert space.is_valid(values), values  # nothing invalid ever reaches the device
        seen.append(dict(values))
        time_ms, error = table(values)
        return Outcome(ok=True, objective=time_ms, error=error)

    result = StageSearch(study, strategy, space, budget=budget, evaluate=evaluate,
                         start=space.default_values()).run()
    return space, result, seen, study


def _optimum(space, table):
    return min(space.iter_valid(space.free_names(space.names), space.default_values()), key=lambda v: table(v)[0])


@pytest.mark.parametrize("name,budget", [("grid", 72), ("random", 72), ("tpe", 40), ("cmaes", 40)])
def test_strategy_finds_the_known_optimum(name, budget):
    table = log2_bowl(CENTRE, {"num_stages": 0.5})
    space, result, seen, _ = _run(name, budget, table)
    assert result.best_values == _optimum(space, table)
    assert result.best.objective == pytest.approx(1.0)
    # every evaluated point is distinct: repeats are answered from the log, not re-run
    keys = [tuple(sorted(v.items())) for v in seen]
    assert len(keys) == len(set(keys)) == result.counted <= budget
    # the first trial is the start point (the declared default), the baseline of the speed-up
    assert seen[0] == space.default_values()


def test_grid_and_random_cover_the_space_without_repeats():
    table = log2_bowl(CENTRE)
    for name in ("grid", "random"):
        space, result, seen, _ = _run(name, 500, table)
        assert result.counted == len(seen) == len(list(space.iter_valid(space.free_names(space.names),
                                                                         space.default_values())))
        assert result.exhausted


def test_nsga2_reports_the_time_error_pareto_front():
    space = build_space("entmax", "torch", target="cpu", context={"rows": 64})
    free = space.free_names(space.accuracy_names)
    assert free == ("niter",)
    niters = space.dim("niter").choices

    def evaluate(values):  # more iterations: slower and more accurate
        n = values["niter"]
        return Outcome(ok=n >= 4, objective=0.5 + 0.1 * n, error=10.0 ** (-n), status="ok" if n >= 4 else "accuracy")

    strategy = get_strategy("nsga2")(space, free, space.default_values(), seed=1, budget=len(niters))
    study = optuna.create_study(sampler=strategy.sampler(), directions=["minimize", "minimize"])
    result = StageSearch(study, strategy, space, budget=len(niters), evaluate=evaluate).run()
    assert result.counted == len(niters)
    front = [v["niter"] for v, _ in result.front]
    assert front == sorted(niters)  # a strict trade-off: every point is on the front, fastest first
    assert result.best_values["niter"] == 4  # the fastest point that passes the gate wins
    times = [o.objective for _, o in result.front]
    assert times == sorted(times)


def test_failures_and_gate_rejections_cannot_win():
    table = log2_bowl(CENTRE)
    space = _space()
    free = space.free_names(space.names)
    optimum = _optimum(space, table)
    strategy = get_strategy("grid")(space, free, space.default_values(), budget=100)
    study = optuna.create_study(sampler=strategy.sampler())

    def evaluate(values):
        if values == optimum:  # the fastest point is wrong: the gate rejects it
            return Outcome(ok=False, objective=0.5, error=1.0, status="accuracy")
        if values["num_warps"] == 8:
            return Outcome(ok=False, objective=None, status="compile")
        return Outcome(ok=True, objective=table(values)[0], error=1e-6)

    result = StageSearch(study, strategy, space, budget=100, evaluate=evaluate).run()
    assert result.best_values != optimum and result.best_values["num_warps"] != 8
    assert result.best.ok and result.failures > 0
    # samplers see failures as worse than any real time
    assert max(t.value for t in study.trials if t.value is not None) == FAILURE_PENALTY


def test_study_resumes_without_repeating_points(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.sqlite'}"
    table = log2_bowl(CENTRE)
    space = _space()
    free = space.free_names(space.names)
    evaluated = []

    def evaluate(values):
        evaluated.append(dict(values))
        return Outcome(ok=True, objective=table(values)[0], error=1e-6)

    for budget in (10, 25):  # a second run with a larger budget continues the first
        strategy = get_strategy("tpe")(space, free, space.default_values(), seed=3, budget=budget)
        study = optuna.create_study(storage=storage, study_name="resume", sampler=strategy.sampler(),
                                    load_if_exists=True)
        result = StageSearch(study, strategy, space, budget=budget, evaluate=evaluate,
                             start=space.default_values()).run()
        assert result.counted == budget
    assert len(evaluated) == 25
    assert len({tuple(sorted(v.items())) for v in evaluated}) == 25


def test_registry_is_lazy_and_names_unknown_strategies():
    assert set(STRATEGIES) == {"grid", "random", "tpe", "cmaes", "nsga2"}
    for name in STRATEGIES:
        assert get_strategy(name).name == name
    with pytest.raises(ValueError, match="unknown strategy 'annealing'"):
        get_strategy("annealing")


@pytest.mark.parametrize("name", ["grid", "random", "tpe"])
def test_configs_differing_only_in_inert_knobs_are_timed_once(name):
    """The attention forward stage with fwd_mode free: once fused, the staged forward's tiles
    are inert, so no strategy times two configs that differ only there, and grid and random
    exhaust the stage at its distinct configs."""
    space = build_space("adasplash", "triton", target="cuda").restrict(
        {"fwd_block_m": (32, 64), "fwd_block_n": (32, 64), "fwd_warps": (4,), "fwd_stages": (2, 3),
         "mask_m": (32,), "mask_n": (32,)})
    free = space.stage_names("fwd")
    start = space.default_values()
    cls = get_strategy(name)
    strategy = cls(space, free, start, seed=3, budget=40)
    study = optuna.create_study(sampler=strategy.sampler(), directions=["minimize"])
    seen = []

    def evaluate(values):
        seen.append(dict(values))
        return Outcome(ok=True, objective=1.0 + 0.1 * (values["fwd_mode"] == "staged") + values["fwd_block_m"] / 1e3,
                       error=1e-4)

    result = StageSearch(study, strategy, space, budget=40, evaluate=evaluate, start=start).run()
    assert seen and all(v == space.canonical(v) for v in seen)
    keys = [tuple(v[n] for n in free) for v in seen]
    assert len(keys) == len(set(keys))
    distinct = list(space.iter_valid(free, start))
    assert sum(v["fwd_mode"] == "fused" for v in seen) == 1 and len(distinct) == 1 + 2 * 2 * 2
    if name != "tpe":
        assert result.exhausted and len(seen) == len(distinct)
    assert result.best_values["fwd_mode"] == "fused"
