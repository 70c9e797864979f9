"""Quantization error of one load: signal-to-quantization-noise ratio per logical weight.

A `QuantErrorLog` belongs to one load (the quant config that load made owns it); the fp8 methods
record, for every logical weight they quantize, the energy of the high-precision weight and of the
error `w - dequant(quant(w))`. SQNR in dB is `10 * log10(signal / noise)`; an exact quantization
(noise 0) is +inf dB. Measuring costs two extra passes over each weight (about the time of the
quantization itself), so it is opt-in, and its seconds are kept apart from the load's.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class QuantErrorLog:
    """(label, signal energy, noise energy) per logical weight, in the order they were quantized."""

    entries: list[tuple[str, float, float]] = field(default_factory=list)
    seconds: float = 0.0  # time spent measuring (`LoadReport.load_seconds` leaves it out)

    def record(self, label: str, signal: float, noise: float) -> None:
        self.entries.append((label, signal, noise))

    def sqnr_db(self) -> dict[str, float]:
        return {label: _db(signal, noise) for label, signal, noise in self.entries}

    def summary(self, worst: int = 5) -> dict:
        """JSON-able: count, min / median / mean / max SQNR (dB), the `worst` lowest labels and the
        seconds the measurement took. An exact quantization (zero error, e.g. an all-zero weight)
        is reported as null, not as infinity (which JSON cannot hold)."""
        values = self.sqnr_db()
        if not values:
            return {"weights": 0, "measure_seconds": self.seconds}
        finite = [v for v in values.values() if math.isfinite(v)] or [math.inf]
        ranked = sorted(values.items(), key=lambda kv: kv[1])
        return {
            "weights": len(values),
            "sqnr_db_min": _json(ranked[0][1]),
            "sqnr_db_median": _json(statistics.median(values.values())),
            "sqnr_db_mean_finite": _json(statistics.fmean(finite)),
            "sqnr_db_max": _json(ranked[-1][1]),
            "worst": [[label, _json(db)] for label, db in ranked[:worst]],
            "measure_seconds": self.seconds,
        }


def _json(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
