"""`default_weight_loader` (`loading/default_loader.py`): the whole checkpoint tensor into the whole
parameter, on every rank, returning the one region it wrote; a shape mismatch is refused naming both
shapes; a mapping rule's keyword arguments are ignored."""

from __future__ import annotations

import pytest
import torch

from streamquant.loading.default_loader import default_weight_loader
from streamquant.loading.parameters import BaseParameter, WeightShapeError
from streamquant.loading.region import full_region
from streamquant.parallel.context import TPContext

from .helpers import assert_written, build


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_default_weight_loader_copies_whole(n):
    ckpt = torch.randn(3, 2)
    p = build(BaseParameter, (3, 2), TPContext(n - 1, n))
    assert_written(p, default_weight_loader(p, ckpt, shard_id="q", expert_id=3), ckpt)
    with pytest.raises(WeightShapeError):
        default_weight_loader(p, torch.randn(2, 3))


def test_default_weight_loader_writes_whole_tensor_and_checks_shape():
    param = BaseParameter(data=torch.full((4, 3), float("nan")), weight_loader=default_weight_loader)
    loaded = randn(4, 3)
    assert default_weight_loader(param, loaded, shard_id=None) == [full_region((4, 3))]
    assert torch.equal(param.data, loaded)
    with pytest.raises(WeightShapeError, match=r"expected shape \(4, 3\), received \(3, 4\)"):
        default_weight_loader(param, loaded.T.contiguous())
