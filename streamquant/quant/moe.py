"""Fused MoE expert weights: the unquantized method and the reference expert computation.

(Stub: filled in by the MoE work.)
"""

from __future__ import annotations


class UnquantizedFusedMoEMethod:
    """w13 [E, 2I/tp, H] and w2 [E, H, I/tp] in the model dtype."""
