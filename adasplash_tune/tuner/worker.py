"""The inside of an evaluation worker process: run one trial request, return plain data.

A trial: validate the config, make fresh random inputs (cached per problem and seed), run the
op once (this is where Triton compiles), check the output (and gradients when tuning backward)
against the fp64 oracle, then time it. Exceptions become a typed status; a CUDA error that
leaves the context unusable marks the result ``poisoned`` and the process exits after replying,
so the parent starts a fresh one.

Fault injection (tests, and GPU fault drills): the request's ``fault`` (by default the
``ADASPLASH_TUNE_FAULT`` environment variable of the parent) is ``ACTION:field=value[,field=value]``
with several rules joined by ``;``. A trial whose config has all those values triggers ACTION:
``raise`` (runtime error), ``compile`` (a compile error), ``illegal`` (on a GPU a real
device-side fault that poisons the CUDA context; on a CPU its error message), ``exit`` (the
process dies), ``hang`` (the process sleeps).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from typing import Any, Mapping

__all__ = ["run_trial", "worker_main", "classify", "parse_faults", "matching_fault", "FAULT_ENV", "PHASES"]

log = logging.getLogger("adasplash_tune")

FAULT_ENV = "ADASPLASH_TUNE_FAULT"
FAULT_ACTIONS = ("raise", "compile", "illegal", "exit", "hang")

_POISON_MARKERS = (
    "illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
    "illegal instruction", "misaligned address", "cuda error", "hip error", "hiperror",
    "an illegal", "context is destroyed",
)
_COMPILE_TYPES = ("CompilationError", "CompileTimeAssertionFailure", "OutOfResources", "PTXASError")


class InjectedCompileError(Exception):
    """Raised by the ``compile`` fault action; classified like a Triton compile error."""


# --------------------------------------------------------------------------- faults


def parse_faults(text: str | None) -> list[tuple[str, dict[str, Any]]]:
    """``"exit:niter=3;hang:q_chunk=64"`` -> [("exit", {"niter": 3}), ("hang", {"q_chunk": 64})]."""
    rules: list[tuple[str, dict[str, Any]]] = []
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        action, _, fields = part.partition(":")
        action = action.strip()
        if action not in FAULT_ACTIONS:
            raise ValueError(f"{FAULT_ENV}: unknown action {action!r}; choose one of {list(FAULT_ACTIONS)}")
        match: dict[str, Any] = {}
        for item in filter(None, (f.strip() for f in fields.split(","))):
            name, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"{FAULT_ENV}: expected field=value, got {item!r}")
            try:
                match[name.strip()] = json.loads(raw)
            except ValueError:
                match[name.strip()] = raw.strip()
        rules.append((action, match))
    return rules


def matching_fault(text: str | None, config: Mapping[str, Any]) -> str | None:
    """The action of the first fault rule that ``config`` matches, or None."""
    for action, match in parse_faults(text):
        if all(name in config and config[name] == value for name, value in match.items()):
            return action
    return None


def _inject(action: str, device: str) -> None:
    if action == "raise":
        raise RuntimeError("injected fault: runtime error")
    if action == "compile":
        raise InjectedCompileError("injected fault: compile error")
    if action == "illegal":
        if str(device).startswith("cuda"):
            _poison_cuda_context(device)
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected fault)")
    if action == "exit":
        os._exit(17)
    if action == "hang":
        while True:
            time.sleep(3600)


def _poison_cuda_context(device: str) -> None:
    """A real device-side fault: an out-of-range gather trips a device assert, after which the
    CUDA context is unusable (exactly what a kernel with an illegal address does)."""
    import torch

    data = torch.zeros(4, device=device)
    index = torch.full((1,), 1 << 20, dtype=torch.long, device=device)
    data[index] = 1.0
    torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- classification


def classify(exc: BaseException) -> tuple[str, bool]:
    """(status, poisoned) of an exception raised by a trial."""
    from ..kernels.spec import ConfigError

    names = {cls.__name__ for cls in type(exc).__mro__}
    module = type(exc).__module__ or ""
    message = str(exc).lower()
    if isinstance(exc, InjectedCompileError) or names & set(_COMPILE_TYPES) or module.startswith("triton.compiler"):
        return "compile", False
    if isinstance(exc, (ConfigError, ValueError, TypeError)):
        return "invalid", False
    if "OutOfMemoryError" in names or "out of memory" in message:
        return "runtime", False
    if any(marker in message for marker in _POISON_MARKERS):
        return "runtime", True
    return "runtime", False


# --------------------------------------------------------------------------- one trial


def _result(status: str, detail: str = "", **values: Any) -> dict[str, Any]:
    out = {"status": status, "detail": detail, "fwd_ms": None, "fwd_spread_ms": None, "bwd_ms": None,
           "bwd_spread_ms": None, "error": None, "grad_error": None, "poisoned": False, "reps": 0,
           "phases": {}}
    out.update(values)
    return out


def _problem_states(req: Mapping[str, Any], state: dict[str, Any], problem) -> tuple[list[dict[str, Any]], bool]:
    """(inputs and oracle of each part of the request's problem -- one part, or one per input
    family of a mix --, whether this call built any of it): built once per (problem, seed,
    device, mode)."""
    ident = json.dumps([req["problem"], req["seed"], req["device"], req["backward"]], sort_keys=True)
    built = state.get("ident") != ident
    if built:
        state.clear()
        parts = problem.parts() if hasattr(problem, "parts") else [problem]
        state.update(ident=ident, parts=[
            {"problem": part, "reference": None,
             "inputs": part.make_inputs(req["device"], int(req["seed"]), requires_grad=bool(req["backward"]))}
            for part in parts])
    if not req.get("compile_only"):
        for ps in state["parts"]:
            if ps["reference"] is None:
                built = True
                ps["reference"] = ps["problem"].reference(ps["inputs"], with_grad=bool(req["backward"]))
    return state["parts"], built


def _compiling_only(backend: str):
    """Triton launches only compile inside (``kernels.launch.compile_only``); other backends run."""
    if backend != "triton":
        return contextlib.nullcontext()
    from ..kernels.launch import compile_only

    return compile_only()


def _run(req: Mapping[str, Any], state: dict[str, Any], phases: dict[str, float]) -> dict[str, Any]:
    """One trial; ``phases`` receives the seconds spent in each step (see :data:`PHASES`).

    A problem on a mix of input families is checked on every part and timed on each: its times
    are the geometric means over the parts, its errors the largest."""
    import torch

    from ..kernels.reference import relative_error, tolerance
    from ..kernels.registry import get_spec
    from .problems import problem_from_dict
    from .timing import TimingOptions, measure

    problem = problem_from_dict(req["problem"])
    if req.get("setup_only"):  # the problem's inputs and oracle, ahead of its first trial
        clock = time.perf_counter()
        _problem_states(req, state, problem)
        _lap(phases, "setup_ahead", clock)
        return _result("ok", "inputs and oracle built")
    backend = req["backend"]
    config = get_spec(problem.kernel, backend).validate(req["config"]).as_dict()
    action = matching_fault(req.get("fault"), {**config, **req.get("extras", {})})
    if action is not None:
        _inject(action, req["device"])
    clock = time.perf_counter()
    parts, built = _problem_states(req, state, problem)
    if built:  # a phase only when this trial built the inputs or the oracle
        clock = _lap(phases, "setup", clock)
    backward = bool(req["backward"])

    def calls(ps: Mapping[str, Any]):
        part, inputs = ps["problem"], ps["inputs"]

        def forward():
            with torch.no_grad():
                return part.run(inputs, backend, config)

        def forward_graph():
            with torch.enable_grad():
                return part.run(inputs, backend, config)

        return forward, forward_graph, part.grad_inputs(inputs), inputs.get("grad")

    if req.get("compile_only"):  # every part runs the same kernels: compile them on the first
        forward, forward_graph, leaves, grad = calls(parts[0])
        with _compiling_only(backend):  # Triton: fill its cache, queue no kernel beside the timer's
            out = forward_graph() if backward else forward()
            if backward:
                torch.autograd.grad(out, leaves, grad)
        _lap(phases, "first_call", clock)
        return _result("ok", "compiled")

    results = []
    for ps in parts:
        forward, forward_graph, leaves, grad = calls(ps)
        out = forward_graph() if backward else forward()
        grads = torch.autograd.grad(out, leaves, grad, retain_graph=True) if backward else None
        results.append((ps, out, grads))
    if str(req["device"]).startswith("cuda"):
        torch.cuda.synchronize(req["device"])
    clock = _lap(phases, "first_call", clock)

    scale = float(req.get("gate", 1.0))
    error, grad_error, detail = 0.0, (0.0 if backward else None), ""
    for ps, out, grads in results:
        ref_out, ref_grads = ps["reference"]
        fwd_tol, grad_tol = scale * tolerance(out.dtype), scale * tolerance(out.dtype, grad=True)
        checked_out, checked_grads = ps["problem"].oracle_view(out, grads)
        part_error = relative_error(checked_out, ref_out)
        part_grad = max(relative_error(g, r) for g, r in zip(checked_grads, ref_grads)) if backward else None
        error = max(error, part_error)
        grad_error = max(grad_error, part_grad) if backward else None
        where = f" on {getattr(ps['problem'], 'inputs', '')}" if len(parts) > 1 else ""
        if not detail and part_error > fwd_tol:
            detail = f"relative error {part_error:.3g} (gate {fwd_tol:.2g}){where}"
        elif not detail and part_grad is not None and part_grad > grad_tol:
            detail = f"gradient relative error {part_grad:.3g} (gate {grad_tol:.2g}){where}"
    gate = not detail
    values: dict[str, Any] = {"error": error, "grad_error": grad_error}
    if not gate and not req.get("time_if_inaccurate"):
        _lap(phases, "check", clock)
        return _result("accuracy", detail, **values)
    clock = _lap(phases, "check", clock)

    options = TimingOptions(**req.get("timing", {}))
    fwd, fwd_spread, bwd, bwd_spread, reps = [], [], [], [], 0
    for ps, _, _ in results:
        forward, forward_graph, leaves, grad = calls(ps)
        timing = measure(forward_graph if backward else forward, req["device"], options)
        fwd.append(timing.median_ms)
        fwd_spread.append(timing.spread_ms)
        reps += timing.reps
        if backward:
            out = forward_graph()
            reading = measure(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True),
                              req["device"], options)
            bwd.append(reading.median_ms)
            bwd_spread.append(reading.spread_ms)
    values.update(fwd_ms=statistics.geometric_mean(fwd), fwd_spread_ms=max(fwd_spread), reps=reps)
    if backward:
        values.update(bwd_ms=statistics.geometric_mean(bwd), bwd_spread_ms=max(bwd_spread))
    _lap(phases, "timing", clock)
    return _result("ok" if gate else "accuracy", detail, **values)


#: The steps of a trial whose seconds a result reports under ``phases``: ``setup`` (inputs and the
#: fp64 oracle, built once per problem: only in the trial that built them), ``first_call`` (the first run: Triton compiles or loads
#: the kernels here), ``check`` (errors against the oracle), ``timing`` (the timed reps).
PHASES = ("setup", "first_call", "check", "timing")


def _lap(phases: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    phases[name] = phases.get(name, 0.0) + (now - since)
    return now


def run_trial(req: Mapping[str, Any], state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one trial request; never raises (failures come back as a typed status)."""
    state = {} if state is None else state
    start = time.perf_counter()
    phases: dict[str, float] = {}
    try:
        result = _run(req, state, phases)
    except Exception as exc:  # every failure of a trial is data for the tuner
        status, poisoned = classify(exc)
        detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        result = _result(status, detail[:500], poisoned=poisoned)
        if status == "runtime" and not poisoned:
            state.clear()  # inputs may be in a bad state after an OOM; rebuild next time
            _empty_cache(req.get("device", "cpu"))
    result["wall_s"] = time.perf_counter() - start
    result["phases"] = phases
    return result


def _empty_cache(device: str) -> None:
    try:
        import torch

        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        pass


# --------------------------------------------------------------------------- process entry


def worker_main(conn, device: str, threads: int | None = None, env: Mapping[str, str] | None = None) -> None:
    """Loop of a worker process: receive a request dict, reply with a result dict; None ends it,
    and so does a parent that is gone (the worker returns quietly).

    ``env`` is the parent's environment when the worker was made (a worker forked from a fork
    server would otherwise see the server's older one).
    """
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not _reply(conn, {"ready": True, "pid": os.getpid()}):
        return
    state: dict[str, Any] = {}
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return
        if req is None:
            return
        result = run_trial(req, state)
        if not _reply(conn, result):
            return
        if result.get("poisoned"):
            conn.close()
            os._exit(3)  # the CUDA context is unusable: let the parent start a fresh worker


def _reply(conn, message: Mapping[str, Any]) -> bool:
    """Send ``message`` to the parent; False (and nothing printed) when the parent is gone."""
    try:
        conn.send(dict(message))
    except OSError:  # BrokenPipeError, ConnectionResetError: the parent was killed meanwhile
        return False
    return True
