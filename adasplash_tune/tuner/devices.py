"""Several devices for one job (``tune --gpus 0,1``): one evaluation worker per device.

With several problems, the problems are spread over the devices (``spread_problems``: largest
first, each device tuning one problem at a time with its own worker and compile pool), so
compiling, the oracle and timing all run in parallel. With one problem, its search times one
trial per device at once through an ``EvaluatorPool`` (``make_evaluator``). All devices must be
the same model: the results are stored for the first one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from .evaluate import Evaluator, EvaluatorPool
from .options import TuneOptions
from .problems import Problem

__all__ = ["make_evaluator", "spread_problems", "evaluator_kwargs", "check_same_model", "problem_cost"]

log = logging.getLogger("adasplash_tune")


def problem_cost(problem: Problem) -> float:
    """Rough relative work of one trial (orders problems largest first across devices)."""
    if problem.kernel == "adasplash":
        work = problem.batch * problem.heads * problem.seq_len ** 2 * problem.head_dim
        return work / 2 if problem.causal else work
    return float(problem.rows * problem.cols)


def evaluator_kwargs(options: TuneOptions) -> dict[str, Any]:
    """Worker settings shared by every device's evaluator."""
    threads = options.threads
    if threads is None and not str(options.device_list[0]).startswith("cuda"):
        threads = 1  # one thread times small CPU problems far more steadily
    return {"trial_timeout": options.trial_timeout, "threads": threads}


def check_same_model(devices: Sequence[str], fingerprint: Mapping[str, Any]) -> None:
    """ValueError unless every GPU in ``devices`` is the model of ``fingerprint`` (the first one's)."""
    if not any(str(d).startswith("cuda") for d in devices):
        return
    from ..device import fingerprint as device_fingerprint

    for device in devices[1:]:
        other = device_fingerprint(device).as_dict()
        if other.get("device_id") != fingerprint.get("device_id"):
            raise ValueError(f"{device} is a {other.get('name')}, {devices[0]} a "
                             f"{fingerprint.get('name')}: tune different GPU models in separate runs")


def make_evaluator(options: TuneOptions, fingerprint: Mapping[str, Any]) -> Evaluator | EvaluatorPool:
    """One evaluator, or a pool of one per device (all of the fingerprinted model)."""
    devices = options.device_list
    kwargs = evaluator_kwargs(options)
    if len(devices) == 1:
        return Evaluator(devices[0], compile_workers=options.compile_workers, **kwargs)
    check_same_model(devices, fingerprint)
    return EvaluatorPool.for_devices(devices, compile_workers=options.compile_workers, **kwargs)


TuneOne = Callable[[int, "float | None", Any], Any]  # (problem index, deadline, evaluator) -> result


def spread_problems(problems: Sequence[Problem], options: TuneOptions, fingerprint: Mapping[str, Any], *,
                    tune: TuneOne, skip: Callable[[int], Any], deadline: float | None) -> tuple[list[Any], list[int]]:
    """Tune ``problems`` with one thread per device: each takes the largest problem not started
    yet and runs ``tune(index, its deadline, its device's evaluator)`` (``skip(index)`` once the
    job's ``deadline`` has passed). Returns (results in the problems' order, trials timed per
    device). ``tune`` must be safe to call from several threads at once."""
    devices = options.device_list
    check_same_model(devices, fingerprint)
    workers_each = options.compile_workers // len(devices)
    kwargs = evaluator_kwargs(options)
    todo: queue.Queue[int] = queue.Queue()
    for index in sorted(range(len(problems)), key=lambda i: -problem_cost(problems[i])):
        todo.put(index)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    usage = [0] * len(devices)

    def device_loop(slot: int, device: str) -> None:
        evaluator = Evaluator(device, compile_workers=workers_each, **kwargs)
        try:
            while not errors:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    results[index] = skip(index)
                    continue
                share = None
                if deadline is not None:  # this problem's fair part of what is left on all devices
                    left = todo.qsize() + 1
                    share = min(deadline, now + (deadline - now) * len(devices) / left)
                log.info("%s: tuning %s", device, problems[index].label())
                results[index] = tune(index, share, evaluator)
                usage[slot] += results[index].evaluated
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
        finally:
            evaluator.close()

    threads = [threading.Thread(target=device_loop, args=(slot, device), daemon=True,
                                name=f"adasplash-tune-{device}") for slot, device in enumerate(devices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(problems))], usage
