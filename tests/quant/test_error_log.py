"""The quantization-error log (`quant/error_log.py`): JSON-safe summaries, worst weights first, an exact
quantization at +inf dB. The energies it is fed: scaled/test_readback.py."""

from __future__ import annotations

import json
import math

import pytest

from streamquant.quant.error_log import QuantErrorLog


def test_summary_is_json_safe_and_ranks_worst_first():
    log = QuantErrorLog()
    log.record("exact", 4.0, 0.0)
    log.record("good", 1000.0, 1.0)
    log.record("bad", 10.0, 1.0)
    summary = log.summary(worst=2)
    assert summary["weights"] == 3
    assert summary["sqnr_db_min"] == pytest.approx(10.0) and summary["sqnr_db_max"] is None
    assert summary["worst"] == [["bad", pytest.approx(10.0)], ["good", pytest.approx(30.0)]]
    assert summary["sqnr_db_mean_finite"] == pytest.approx(20.0)
    assert json.loads(json.dumps(summary, allow_nan=False))["weights"] == 3
    assert math.isinf(log.sqnr_db()["exact"])
