"""Kernel declarations: defaults, validation, JSON round trip, grids and problem keys."""

from __future__ import annotations

import json

import pytest

from adasplash_tune.kernels.problem import alpha_class, attention_key, entmax_key, integer_b, key_to_json, pow2_bucket
from adasplash_tune.kernels.registry import BACKENDS, KERNELS, all_specs, config_from_json, get_spec
from adasplash_tune.kernels.spec import ConfigError, Constraint, KernelSpec, Param

SPECS = all_specs()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kernel}-{s.backend}")
def test_default_is_valid_and_complete(spec: KernelSpec) -> None:
    default = spec.default()
    assert set(default.as_dict()) == set(spec.names)
    assert spec.validate(default.as_dict(), partial=False) == default
    assert "niter" in spec.names and spec.param("niter").accuracy


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kernel}-{s.backend}")
def test_json_round_trip(spec: KernelSpec) -> None:
    values = {p.name: p.choices[-1] for p in spec.params}
    cfg = next(spec.grid()) if not spec.is_valid(values) else spec.validate(values)
    text = cfg.to_json()
    assert json.loads(text)["kernel"] == spec.kernel
    assert config_from_json(text) == cfg
    assert hash(config_from_json(text)) == hash(cfg)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kernel}-{s.backend}")
def test_unknown_field_is_named(spec: KernelSpec) -> None:
    with pytest.raises(ConfigError, match="'no_such_knob'"):
        spec.validate({"no_such_knob": 1})


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kernel}-{s.backend}")
def test_out_of_domain_value_is_named(spec: KernelSpec) -> None:
    with pytest.raises(ConfigError, match="'niter'"):
        spec.validate({"niter": 7777})
    with pytest.raises(ConfigError, match="'niter'"):
        spec.validate({"niter": "8"})


def test_bool_is_not_an_int() -> None:
    spec = KernelSpec("k", "torch", (Param("flag", (True, False), True), Param("n", (0, 1), 0)))
    with pytest.raises(ConfigError):
        spec.validate({"n": True})
    assert spec.validate({"flag": False})["flag"] is False


def test_constraint_violation_is_named() -> None:
    spec = KernelSpec(
        "toy", "torch",
        (Param("a", (1, 2, 4), 1), Param("b", (1, 2, 4), 1)),
        (Constraint(("a", "b"), "a <= b", lambda v, c: v["a"] <= v["b"]),),
    )
    with pytest.raises(ConfigError, match="'a'.*a <= b"):
        spec.validate({"a": 4, "b": 2})
    assert sorted((c["a"], c["b"]) for c in spec.grid()) == [(1, 1), (1, 2), (1, 4), (2, 2), (2, 4), (4, 4)]
    assert list(c["b"] for c in spec.grid(a=4)) == [4]


def test_partial_and_complete_validation() -> None:
    spec = get_spec("adasplash", "torch")
    assert spec.validate({"q_chunk": 64})["q_chunk"] == 64
    with pytest.raises(ConfigError, match="lacks fields"):
        spec.validate({"q_chunk": 64}, partial=False)


def test_config_of_other_kernel_is_rejected() -> None:
    cfg = get_spec("entmax", "torch").default()
    with pytest.raises(ConfigError, match="not adasplash"):
        get_spec("adasplash", "torch").validate(cfg)


def test_spec_module_is_plain_types() -> None:
    """kernels.spec imports nothing of the package (the registry imports it, never the reverse)."""
    import ast
    import inspect

    from adasplash_tune.kernels import spec as spec_module

    tree = ast.parse(inspect.getsource(spec_module))
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
                 if alias.name.startswith("adasplash_tune")}
    assert imported == set()


def test_malformed_json() -> None:
    with pytest.raises(ConfigError, match="malformed"):
        config_from_json("{not json")
    with pytest.raises(ConfigError, match="malformed"):
        config_from_json('{"kernel": "entmax"}')


def test_registry_errors() -> None:
    assert {s.kernel for s in SPECS} == set(KERNELS) and {s.backend for s in SPECS} == set(BACKENDS)
    with pytest.raises(ValueError, match="unknown kernel"):
        get_spec("softmax", "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        get_spec("entmax", "cuda")


def test_source_hash_is_stable_and_distinct() -> None:
    hashes = {s.source_hash() for s in SPECS}
    assert len(hashes) == len(SPECS)
    assert all(len(h) == 16 for h in hashes)
    assert get_spec("entmax", "torch").source_hash() == get_spec("entmax", "torch").source_hash()


def test_describe_lists_every_param() -> None:
    spec = get_spec("adasplash", "triton")
    text = spec.describe()
    assert all(name in text for name in spec.names)


@pytest.mark.parametrize("n,expected", [(1, 16), (16, 16), (17, 32), (100, 128), (4096, 4096), (4097, 8192)])
def test_seq_bucket(n: int, expected: int) -> None:
    assert pow2_bucket(n, 16) == expected


def test_alpha_class() -> None:
    assert [alpha_class(a) for a in (1.5, 2.0, 2, 1.25, 1.333, 4 / 3, 1 + 1 / 3, 1.7, 1.2)] == [
        "1.5", "2", "2", "1.25", "generic", "4/3", "4/3", "generic", "generic"]
    assert [integer_b(a) for a in (2.0, 1.5, 4 / 3, 1.25, 1.2, 1.7, 1.0, 2.5)] == [1, 2, 3, 4, 0, 0, 0, 0]


def test_attention_key_fields_and_canonical_json() -> None:
    key = attention_key(backend="triton", dtype="bfloat16", batch=4, q_heads=16, kv_heads=4, seq_len=3000,
                        head_dim=80, alpha=1.5, causal=True, varlen=False)
    assert key == {"backend": "triton", "dtype": "bfloat16", "head_dim": 80, "causal": True, "alpha": "1.5",
                   "gqa": 4, "varlen": False, "seq": 4096, "bh": 64}
    assert key_to_json(key) == key_to_json(dict(reversed(list(key.items()))))


def test_entmax_key() -> None:
    key = entmax_key(backend="torch", dtype="float32", rows=100, cols=255, alpha=1.7)
    assert key == {"backend": "torch", "dtype": "float32", "alpha": "generic", "cols": 256, "rows": 128}
    assert entmax_key(backend="torch", dtype="float32", rows=1, cols=1, alpha=1.25)["alpha"] == "1.25"


def test_config_hash_is_cached_but_never_pickled():
    """Configs key the call path's memos, so their hash is computed once; a pickled config (sent to
    a tuner worker) must not carry it: string hashes differ between processes."""
    import pickle

    from adasplash_tune.kernels.declarations.attention import TRITON

    cfg = TRITON.default()
    assert hash(cfg) == hash(TRITON.default())
    assert "_hash" in cfg.__dict__
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and "_hash" not in back.__dict__
    assert {cfg: 1}[back] == 1
    assert cfg.replace(niter=3) != cfg
