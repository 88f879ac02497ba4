"""The tuner: search spaces from the kernel declarations, strategies, evaluation in worker
processes under the fp64 accuracy gate, and tuning jobs that write the config cache.

Modules (imported on use; importing this package does no work), one job each:

- ``job``: a tuning job, problems x space x budget -> cache (``TuneJob``); ``options``
  (``TuneOptions``) and ``results`` (``ProblemResult``, ``ProgressEvent``) are its inputs and outputs;
- ``problem_search``: the search of one problem, stage by stage; ``duel``: the final duel of its
  winner against the default; ``cache_writer``: what reaches the cache, and when;
- ``devices``: several devices for one job (problems spread over them, or a pool of evaluators);
- ``search``: one stage as an ask/tell loop over an Optuna study (``outcome``: what it is told;
  ``lost_trials``: trials lost with their tuner, found by Optuna's heartbeats);
- ``space`` (pruned search spaces per backend target), ``strategies`` (grid, random, TPE,
  CMA-ES, NSGA-II), ``studies`` (study storage and names);
- ``evaluate`` / ``worker`` / ``timing``: trials in worker processes; ``problems``: tuning
  problems and their keys.
"""
