"""The whole-tensor weight loader for replicated parameters (norm weights, biases kept whole).

`default_weight_loader` copies the full checkpoint tensor into the full parameter through
`write_region`, so it shape-checks and returns the one region it wrote, like every other loader.
Extra keyword arguments from a mapping rule are accepted and ignored: a replicated tensor has no
shard to choose.
"""

from __future__ import annotations

import torch

from streamquant.loading.parameters import write_region
from streamquant.loading.region import Region, full_region


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, **kwargs) -> list[Region]:
    """Copy all of `loaded` into all of `param`; returns `[full region]`."""
    return write_region(param, full_region(param.shape), loaded)
