"""An interrupted run (the process killed with SIGKILL mid-trial) resumes from the stored trials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from adasplash_tune.cache.store import open_store
from adasplash_tune.tuner.search import ATTR

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")

ARGS = ["tune", "--backend", "torch", "--seq-len", "64", "--head-dim", "16", "--heads", "1", "--batch", "1",
        "--strategy", "grid", "--trials", "6", "--seed", "9"]


def _cli(tmp_path, extra_env=None):
    env = dict(os.environ, ADASPLASH_TUNE_CACHE=str(tmp_path / "cache.sqlite"), **(extra_env or {}))
    cmd = [sys.executable, "-c", "from adasplash_tune.cli import main; main()", *ARGS,
           "--storage", f"sqlite:///{tmp_path / 'studies.sqlite'}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _trials(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'studies.sqlite'}")
    try:
        studies = storage.get_all_studies()
        return [t for s in studies for t in storage.get_all_trials(s._study_id)]
    finally:
        storage.remove_session()
        storage.engine.dispose()


def test_killed_run_resumes_with_the_trials_already_stored(tmp_path):
    # grid order after the default: (q_chunk 16, niter 1), (16, 2), (16, 3) <- this one hangs
    proc = _cli(tmp_path, {"ADASPLASH_TUNE_FAULT": "hang:niter=3"})
    deadline = time.monotonic() + 120
    try:
        while True:
            assert time.monotonic() < deadline, "the first run never reached the hanging trial"
            assert proc.poll() is None, proc.communicate()
            if (tmp_path / "studies.sqlite").exists():
                try:
                    trials = _trials(tmp_path)
                except Exception:  # the schema is still being created
                    trials = []
                done = [t for t in trials if t.state == TrialState.COMPLETE]
                if len(done) == 3 and any(t.state == TrialState.RUNNING for t in trials):
                    break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker, as kill -9 would
        proc.wait()
    before = {t.number: t.user_attrs[ATTR]["config"] for t in _trials(tmp_path) if t.state == TrialState.COMPLETE}
    assert len(before) == 3

    proc = _cli(tmp_path)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    trials = _trials(tmp_path)
    counted = [t for t in trials if t.user_attrs.get(ATTR, {}).get("counted")]
    assert len(counted) == 6  # 3 from the killed run + 3 new: the budget, not 3 + 6
    for number, config in before.items():  # the stored trials were kept, not re-run
        assert trials[number].user_attrs[ATTR]["config"] == config
    configs = [tuple(sorted(t.user_attrs[ATTR]["config"].items())) for t in counted]
    assert len(set(configs)) == 6
    # the trial in flight was lost (marked failed, not counted); the run finished and cached a winner
    assert any(t.state == TrialState.FAIL and not t.user_attrs.get(ATTR) for t in trials)
    assert "B1 H1 N64 D16" in out and "tuned" in out
    with open_store(str(tmp_path / "cache.sqlite"), readonly=True) as store:
        [entry] = store.entries(kernel="adasplash")
        assert tuple(sorted(entry.config.items())) in configs and 1 <= entry.trials <= 6
