"""The tests mirror the package: the tests of `streamquant/<room>/<mod>.py` are in `tests/<room>/test_<mod>.py`
(of `streamquant/<mod>.py`: `tests/test_<mod>.py`), so a module's tests are found from its path and a module
without any is seen here. One direction only: a module's tests may also be split by aspect
(`test_<mod>_<aspect>.py`, e.g. checkpoint/test_reader_security.py), and tests of several modules together keep
descriptive names beside them (quant/scaled/test_end_to_end.py, models/test_hf_equivalence.py, ...).

A module without its file must be in ALLOWED, saying where it is tested and why it has no file of its own.
Package `__init__.py` files are not required to have one. Every test folder is a package, so two rooms'
`test_<mod>.py` never collide as modules (pytest imports them by dotted name)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "streamquant"
TESTS = ROOT / "tests"

# module (path under streamquant/) -> where it is tested instead, and why it has no test file of its own
ALLOWED = {
    "__main__.py": "two lines that call cli.main: run as `python -m streamquant` by "
                   "tests/cli/test_generate.py::test_generate_tp2_in_subprocess",
    "loading/errors.py": "exception classes only, raised and matched by the loading tests",
    "models/base.py": "CausalLM (table-driven loading, KV caches, positions) under every architecture: "
                      "tests/models/test_hf_equivalence.py; a model that is not ready: tests/test_reload.py",
    "models/llama.py": "Llama, Mistral, Qwen2 and Qwen3 logits against transformers: tests/models/test_hf_equivalence.py",
    "models/opt.py": "OPT logits against transformers: tests/models/test_hf_equivalence.py",
    "models/qwen_moe.py": "Qwen2-MoE and Qwen3-MoE logits against transformers: tests/models/test_hf_equivalence.py",
    "rl/protocol.py": "what rl/sync.py and rl/receiver.py share (the protocol version, the report collective, "
                      "SyncStats, the bar of a plan): every sync of tests/rl/test_sync.py, test_sync_progress.py "
                      "(the bars) and test_receiver.py (SyncStats of deltas)",
    "quant/scaled/moe.py": "ScaledMoEMethod needs a streaming load to fill it: the MoE cases of "
                           "tests/quant/scaled/test_end_to_end.py (codes and scales of every expert against the "
                           "numpy reference, logits) and test_weights.py (TP=2 bitwise TP=1)",
}


def modules() -> list[str]:
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def mirrored(module: str) -> Path:
    path = Path(module)
    return TESTS / path.parent / f"test_{path.stem}.py"


def test_every_module_has_its_test_file():
    missing = [f"streamquant/{m} -> {mirrored(m).relative_to(ROOT)}" for m in modules()
               if m not in ALLOWED and not mirrored(m).is_file()]
    assert not missing, ("modules without a test file at the mirrored path (write one, or add the module to "
                         "tests/test_mirror.py's ALLOWED with where it is tested):\n  " + "\n  ".join(missing))


def test_the_allow_list_is_current():
    """Every allowed module still exists and still has no file of its own (else it leaves ALLOWED)."""
    stale = [m for m in ALLOWED if m not in modules() or mirrored(m).is_file()]
    assert not stale, f"ALLOWED entries that no longer apply: {stale}"
    assert all(reason.strip() for reason in ALLOWED.values())


def test_every_test_folder_is_a_package():
    folders = sorted({p.parent for p in TESTS.rglob("test_*.py")} - {TESTS})
    missing = [str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()]
    assert not missing, f"test folders without an __init__.py: {missing}"


def test_the_mirror_rule_itself():
    assert mirrored("config.py") == TESTS / "test_config.py"
    assert mirrored("quant/math/native/build.py") == TESTS / "quant" / "math" / "native" / "test_build.py"
    assert "cli/main.py" in modules() and "api.py" in modules() and "quant/__init__.py" not in modules()
