"""The tuner: search spaces from the kernel declarations, strategies, evaluation in worker
processes under the fp64 accuracy gate, and tuning jobs that write the config cache.

Modules (imported on use; importing this package does no work): ``space`` (pruned search spaces
per backend target), ``strategies`` (grid, random, TPE, CMA-ES, NSGA-II), ``search`` (one staged
ask/tell search over an Optuna study), ``evaluate`` / ``worker`` / ``timing`` (trials in worker
processes), ``problems`` (tuning problems and their keys), ``studies`` (study storage) and
``job`` (problems x space x budget -> cache).
"""
