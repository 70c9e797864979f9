"""permute_param_layout_: move the input/output (and packed) dims to where a kernel wants them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamquant.loading.layout import permute_param_layout_
from streamquant.loading.parameters import (
    BaseParameter,
    ColumnParameter,
    ModelWeightParameter,
    PackedParameter,
    RowParameter,
)
from streamquant.parallel import TPContext

from .helpers import SETTINGS, unused_loader


def expected_permutation(ndim, cur_in, cur_out, new_in, new_out):
    """perm[j] = the old dim that ends up at j; the other dims keep their relative order."""
    perm = [None] * ndim
    perm[new_in], perm[new_out] = cur_in, cur_out
    others = iter(d for d in range(ndim) if d not in (cur_in, cur_out))
    return [d if d is not None else next(others) for d in perm]


@st.composite
def layouts(draw):
    ndim = draw(st.integers(2, 4))
    shape = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    cur = draw(st.permutations(range(ndim)))
    new = draw(st.permutations(range(ndim)))
    return shape, cur[0], cur[1], new[0], new[1], draw(st.integers(0, ndim - 1))


def _weight(data, cls=ModelWeightParameter, **kwargs):
    return cls(data=data, weight_loader=unused_loader, tp=TPContext(), **kwargs)


@SETTINGS
@given(case=layouts())
def test_permute_to_requested_dims(case):
    shape, cur_in, cur_out, new_in, new_out, _ = case
    data = torch.randn(shape)
    p = _weight(data.clone(), input_dim=cur_in, output_dim=cur_out)
    assert permute_param_layout_(p, input_dim=new_in, output_dim=new_out) is p
    assert torch.equal(p.detach(), data.permute(*expected_permutation(len(shape), cur_in, cur_out, new_in, new_out)))
    assert (p.input_dim, p.output_dim) == (new_in, new_out)
    assert p.shape[new_in] == shape[cur_in] and p.shape[new_out] == shape[cur_out]


@SETTINGS
@given(case=layouts())
def test_permute_packed_dim_follows_or_is_refused(case):
    shape, cur_in, cur_out, new_in, new_out, packed = case
    data = torch.randn(shape)
    perm = expected_permutation(len(shape), cur_in, cur_out, new_in, new_out)
    p = _weight(data.clone(), PackedParameter, input_dim=cur_in, output_dim=cur_out, packed_factor=8, packed_dim=packed)
    wrong = [j for j in range(len(shape)) if perm[j] != packed]
    with pytest.raises(ValueError, match="re-pack"):
        permute_param_layout_(p, input_dim=new_in, output_dim=new_out, packed_dim=wrong[0])
    assert torch.equal(p.detach(), data) and (p.input_dim, p.output_dim, p.packed_dim) == (cur_in, cur_out, packed)
    permute_param_layout_(p, input_dim=new_in, output_dim=new_out, packed_dim=perm.index(packed))
    assert torch.equal(p.detach(), data.permute(*perm))
    assert (p.input_dim, p.output_dim, p.packed_dim) == (new_in, new_out, perm.index(packed))


def test_packed_dim_on_an_unpacked_parameter_is_refused():
    p = _weight(torch.randn(2, 3), input_dim=1, output_dim=0)
    with pytest.raises(ValueError):
        permute_param_layout_(p, input_dim=0, output_dim=1, packed_dim=0)


@pytest.mark.parametrize("cls,declared", [(ColumnParameter, {"output_dim": 0}), (RowParameter, {"input_dim": 1})])
@pytest.mark.parametrize("new_in,new_out", [(0, 1), (1, 0)])
def test_missing_dim_inferred_for_2d(cls, declared, new_in, new_out):
    data = torch.randn(2, 3)  # stored [out, in]
    p = _weight(data.clone(), cls, **declared)
    permute_param_layout_(p, input_dim=new_in, output_dim=new_out)
    assert torch.equal(p.detach(), data.t() if new_in == 0 else data)
    for name, value in (("input_dim", new_in), ("output_dim", new_out)):
        if name in declared:
            assert getattr(p, name) == value
        else:
            assert not hasattr(p, name)  # inferred, not invented


def test_missing_dim_not_inferred_beyond_2d():
    p = _weight(torch.randn(2, 3, 4), ColumnParameter, output_dim=0)
    with pytest.raises(ValueError):
        permute_param_layout_(p, input_dim=0, output_dim=1)
    with pytest.raises(ValueError):
        permute_param_layout_(_weight(torch.randn(2, 3), BaseParameter), input_dim=0, output_dim=1)


def test_packed_dim_follows_permutation_when_not_requested():
    p = _weight(torch.randn(2, 3), PackedParameter, input_dim=1, output_dim=0, packed_factor=8, packed_dim=0)
    permute_param_layout_(p, input_dim=0, output_dim=1)
    assert p.packed_dim == p.output_dim == 1
