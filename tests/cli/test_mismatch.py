"""`streamquant mismatch` (`cli/mismatch.py`): one run per scheme, dynamic activations and weight-only,
in the --json result. (The probe's numbers: tests/rl/test_mismatch.py.)"""

from __future__ import annotations

import json

import pytest

from streamquant.cli.main import main

from hf_cases import CASES, make_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(next(c for c in CASES if c.name == "llama"), tmp_path_factory.mktemp("mm"))


def test_mismatch_command_writes_both_runs_of_the_scheme(llama, tmp_path):
    out = tmp_path / "m.json"
    assert main(["mismatch", str(llama), "--quantization", "fp8", "--max-new-tokens", "3", "--dtype", "float32",
                 "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["runs"]) == {"fp8", "fp8+weight-only"}
