"""Several tuners sharing one study storage and one cache (``tune --storage URL --cache URL`` on
several hosts): trials finished elsewhere count, points in flight elsewhere are not repeated, a
trial lost with its tuner is failed (heartbeats), and no evaluated trial is ever lost. The two-process test runs on an
SQLite file always and, with the ``postgres`` marker, on a PostgreSQL server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from adasplash_tune.cache.store import open_store
from adasplash_tune.tuner.job import TuneJob, TuneOptions
from adasplash_tune.tuner.problems import AttentionProblem
from adasplash_tune.tuner import lost_trials
from adasplash_tune.tuner.lost_trials import OWNER, Heartbeats, host_id, left_behind
from adasplash_tune.tuner.search import ATTR
from adasplash_tune.tuner.studies import open_storage

from .._postgres import fresh_schema
from .conftest import FAKE_GPU, TableEvaluator

optuna.logging.set_verbosity(optuna.logging.WARNING)

PROBLEM = AttentionProblem(batch=1, heads=2, kv_heads=1, seq_len=45, head_dim=24, alpha=1.5, causal=True)


def _table(config):
    return 1.0 + abs(config["q_chunk"] - 32) / 16 + abs(config["niter"] - 6) / 4, 10.0 ** -(config["niter"] + 2)


class HookedTable(TableEvaluator):
    """Calls ``hook(call_index)`` before each evaluation: another tuner acting meanwhile."""

    def __init__(self, hook) -> None:
        super().__init__(_table)
        self.hook = hook

    def evaluate(self, request):
        self.hook(len(self.calls))
        return super().evaluate(request)


def _all_trials(url: str) -> list:
    storage = optuna.storages.RDBStorage(url)
    try:
        return [t for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)]
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _other_tuner(url: str, storage=None) -> optuna.Study:
    """The one study of ``url`` as another tuner opens it (``storage``: with heartbeats)."""
    [summary] = optuna.get_all_study_summaries(url)
    return optuna.load_study(study_name=summary.study_name, storage=storage or url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def studies_url(request, storage_url):
    """A study storage on an SQLite file and, with the ``postgres`` marker, on a PostgreSQL server."""
    if request.param == "postgres":
        with fresh_schema() as url:
            yield url
        return
    yield storage_url


@pytest.fixture
def quick_heartbeats(monkeypatch):
    """Heartbeats every second; a trial is lost after 2 s without one."""
    monkeypatch.setattr(lost_trials, "HEARTBEAT_S", 1)
    monkeypatch.setattr(lost_trials, "GRACE_S", 2)


def _job(store, url, evaluator, trials=6):
    opts = TuneOptions(strategy="grid", trials=trials, storage=url, seed=3, confirm=0)  # the search alone
    return TuneJob([PROBLEM], kernel="adasplash", backend="torch", store=store, options=opts, evaluator=evaluator,
                   fingerprint=FAKE_GPU)


def test_a_point_another_live_tuner_is_running_is_left_to_it_and_counted(store, storage_url):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    other: dict = {}
    taken = {"q_chunk": 16, "k_chunk": 64, "niter": 3}  # the grid reaches it as the 4th trial

    def hook(call: int) -> None:
        if call == 0:  # the other tuner asks (16, 3) before this one gets there
            study = _other_tuner(storage_url)
            [mine] = study.get_trials(states=(TrialState.RUNNING,))
            study.enqueue_trial({"q_chunk": 0, "niter": 2})  # choice indices: q_chunk 16, niter 3
            trial = study.ask(mine.distributions)
            assert trial.params == {"q_chunk": 0, "niter": 2}
            trial.set_user_attr(OWNER, {"host": host_id(), "pid": sleeper.pid, "run": "other"})
            other.update(study=study, trial=trial)
        if call == 4:  # ... and finishes it later
            t, e = _table(taken)
            other["trial"].set_user_attr(ATTR, {"config": taken, "counted": True, "ok": True, "status": "ok",
                                                "objective": t, "error": e, "measured": {}, "run": "other"})
            other["study"].tell(other["trial"], t)

    evaluator = HookedTable(hook)
    try:
        [result] = _job(store, storage_url, evaluator).run()
    finally:
        sleeper.kill()
        sleeper.wait()
    configs = [{k: c[k] for k in taken} for c in evaluator.calls]
    assert taken not in configs  # never evaluated here
    assert result.trials == 6 and result.evaluated == len(evaluator.calls) == 5
    counted = [t for t in _all_trials(storage_url) if t.user_attrs.get(ATTR, {}).get("counted")]
    assert len(counted) == 6 and Counter(t.user_attrs[ATTR]["run"] == "other" for t in counted)[True] == 1


def test_a_result_whose_trial_another_tuner_failed_is_kept_as_a_new_trial(store, storage_url):
    def hook(call: int) -> None:
        if call == 2:  # a tuner that wrongly takes this run's trial in flight for abandoned
            study = _other_tuner(storage_url)
            [mine] = study.get_trials(states=(TrialState.RUNNING,))
            study.tell(mine.number, state=TrialState.FAIL)

    evaluator = HookedTable(hook)
    [result] = _job(store, storage_url, evaluator).run()
    trials = _all_trials(storage_url)
    counted = [t for t in trials if t.user_attrs.get(ATTR, {}).get("counted")]
    assert result.trials == result.evaluated == len(counted) == len(evaluator.calls) == 6
    assert Counter(tuple(sorted(t.user_attrs[ATTR]["config"].items())) for t in counted).most_common(1)[0][1] == 1
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and ATTR not in failed[0].user_attrs
    # the re-added trial holds exactly what was measured for the failed one's point
    again = [t for t in counted if t.params == failed[0].params]
    assert len(again) == 1 and again[0].value == pytest.approx(_table(again[0].user_attrs[ATTR]["config"])[0])


def test_a_running_trial_beats_and_is_not_failed_while_its_tuner_lives(store, studies_url, quick_heartbeats):
    looked: list[int] = []

    def hook(call: int) -> None:
        if call == 1:  # a slow trial (twice the grace period); another tuner looks for lost trials
            other = _other_tuner(studies_url, open_storage(studies_url))
            time.sleep(4)
            lost_trials.fail_stale(other)
            looked.extend(t.number for t in other.get_trials(states=(TrialState.RUNNING,)))

    [result] = _job(store, studies_url, HookedTable(hook), trials=3).run()
    assert len(looked) == 1 and result.trials == result.evaluated == 3
    assert not [t for t in _all_trials(studies_url) if t.state == TrialState.FAIL]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # the other tuner's ask
def test_a_trial_lost_with_another_host_is_failed_after_the_grace_period(store, studies_url, quick_heartbeats):
    other: dict = {}

    def hook(call: int) -> None:
        if call == 0:  # a tuner on another host asks (q_chunk 16, niter 3), beats once, and its host dies
            storage = open_storage(studies_url)
            study = _other_tuner(studies_url, storage)
            [mine] = study.get_trials(states=(TrialState.RUNNING,))
            study.enqueue_trial({"q_chunk": 0, "niter": 2})  # choice indices: q_chunk 16, niter 3
            trial = study.ask(mine.distributions)
            Heartbeats(storage, study.study_name).add(trial.number)  # its one and only beat
            trial.set_user_attr(OWNER, {"host": "another-host|boot", "pid": os.getpid(), "run": "other"})
            other["number"] = trial.number

    evaluator = HookedTable(hook)
    [result] = _job(store, studies_url, evaluator).run()
    [failed] = [t for t in _all_trials(studies_url) if t.state == TrialState.FAIL]
    assert failed.number == other["number"] and ATTR not in failed.user_attrs  # lost, not counted
    # the stage waited for it and, once it was failed, took its place in the budget: 6 trials here
    configs = [tuple(sorted(c.items())) for c in evaluator.calls]
    assert len(set(configs)) == len(configs) == result.trials == result.evaluated == 6


def test_who_counts_as_lost_on_this_host():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = datetime.now()

    def trial(owner=None, started=now):
        return SimpleNamespace(user_attrs={} if owner is None else {OWNER: owner}, datetime_start=started)

    def lost(t) -> bool:
        return left_behind(t, "this-run")

    here, there = host_id(), "another-host|boot"
    assert lost(trial({"host": here, "pid": gone.pid, "run": "x"}))
    assert not lost(trial({"host": here, "pid": os.getppid(), "run": "x"}))
    assert lost(trial({"host": here, "pid": os.getpid(), "run": "an-earlier-search"}))
    assert not lost(trial({"host": here, "pid": os.getpid(), "run": "this-run"}))
    assert not lost(trial({"host": there, "pid": gone.pid, "run": "x"}))  # other hosts: heartbeats decide
    # ... but for the leases of older versions (which never beat), once passed
    assert lost(trial({"host": there, "pid": gone.pid, "run": "x", "expires": time.time() - 1}))
    assert not lost(trial({"host": there, "pid": gone.pid, "run": "x", "expires": time.time() + 60}))
    assert not lost(trial())  # no owner yet: asked a moment ago
    assert lost(trial(started=now - timedelta(hours=1)))


# --------------------------------------------------------------------------- two tuner processes

ARGS = ["tune", "--backend", "torch", "--seq-len", "64", "--head-dim", "16", "--heads", "1", "--batch", "1",
        "--strategy", "random", "--trials", "12", "--confirm", "0", "--json"]  # the shared search alone


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared(request, tmp_path):
    """(study storage URL, cache location) that both tuners use."""
    if request.param == "postgres":
        with fresh_schema() as studies, fresh_schema() as cache:
            yield studies, cache
        return
    yield f"sqlite:///{tmp_path / 'studies.sqlite'}", str(tmp_path / "cache.sqlite")


def test_two_tuner_processes_sharing_storage_and_cache_lose_no_trial(shared, tmp_path):
    storage, cache = shared
    env = dict(os.environ, ADASPLASH_TUNE_CACHE=str(tmp_path / "unused.sqlite"))
    env.pop("ADASPLASH_TUNE_FAULT", None)
    procs = [subprocess.Popen([sys.executable, "-c", "from adasplash_tune.cli import main; main()", *ARGS,
                               "--seed", str(seed), "--storage", storage, "--cache", cache],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    results = [json.loads(out)[0] for out, _ in outputs]
    assert all(r["status"] == "tuned" for r in results)

    trials = _all_trials(storage)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # one study; no number given twice
    counted = [t for t in trials if t.user_attrs.get(ATTR, {}).get("counted")]
    configs = Counter(tuple(sorted(t.user_attrs[ATTR]["config"].items())) for t in counted)
    assert set(configs.values()) == {1}  # no point evaluated twice
    # every trial either tuner evaluated is in the study, and the budget was shared, not doubled
    assert len(counted) == sum(r["evaluated"] for r in results)
    assert len(counted) == 12 and all(r["trials"] == 12 for r in results)

    ok = [t for t in counted if t.user_attrs[ATTR]["ok"]]
    fastest = min(t.user_attrs[ATTR]["objective"] for t in ok)
    with open_store(cache, readonly=True) as store:
        [entry] = store.entries(kernel="adasplash")
    assert entry.time_ms == pytest.approx(fastest)
    assert entry.config in [t.user_attrs[ATTR]["config"] for t in ok if t.user_attrs[ATTR]["objective"] == fastest]


# --------------------------------------------------------------------------- many searches at once

_SEARCHER = """
import sys, optuna
from adasplash_tune.tuner.outcome import Outcome
from adasplash_tune.tuner.search import StageSearch
from adasplash_tune.tuner.space import build_space
from adasplash_tune.tuner.strategies import get_strategy
from adasplash_tune.tuner.studies import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
url, seed = sys.argv[1], int(sys.argv[2])
space = build_space("entmax", "triton", target="cuda").restrict(
    {"block_n": (256, 512, 1024, 2048), "rows": (1, 2, 4), "num_warps": (2, 4, 8), "num_stages": (1, 2),
     "niter": (10,), "tau_tol": ("auto",), "tau_init": ("subset",)})
free = space.free_names(space.names)
strategy = get_strategy("random")(space, free, space.default_values(), seed=seed, budget=40)
storage = open_storage(url)
study = optuna.create_study(study_name="shared", storage=storage, sampler=strategy.sampler(), load_if_exists=True)
result = StageSearch(study, strategy, space, budget=40, storage=storage, start=space.default_values(),
                     evaluate=lambda v: Outcome(ok=True, objective=v["block_n"] / v["num_warps"], error=0.0)).run()
print(result.evaluated)
"""


def test_four_searches_on_one_sqlite_study_claim_every_trial_once(tmp_path):
    """Proposed points start as RUNNING trials in one insert: four processes proposing at once on
    an SQLite file (no row locks) never run one trial twice nor leave a WAITING trial behind
    (``enqueue_trial`` + ``ask`` did both, now and then)."""
    url = f"sqlite:///{tmp_path / 'studies.sqlite'}"
    open_storage(url)  # the schema, once, before the racers start
    procs = [subprocess.Popen([sys.executable, "-c", _SEARCHER, url, str(seed)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "marked failed by another tuner" not in err, err  # a trial claimed twice
    trials = _all_trials(url)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    counted = [t for t in trials if t.user_attrs.get(ATTR, {}).get("counted")]
    configs = Counter(tuple(sorted(t.user_attrs[ATTR]["config"].items())) for t in counted)
    assert len(counted) == 40 and set(configs.values()) == {1}
    assert sum(int(out.split()[-1]) for out, _ in outputs) == 40
