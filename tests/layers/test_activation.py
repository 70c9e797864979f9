"""SiluAndMul against transformers' silu(gate) * up."""

import pytest
import torch
from transformers.activations import ACT2FN

from streamquant.layers.activation import SiluAndMul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_equals_transformers(dtype):
    x = torch.randn(3, 5, 2 * 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    gate, up = x[..., :16], x[..., 16:]
    out = SiluAndMul()(x)
    assert out.shape == (3, 5, 16) and out.dtype == dtype
    assert torch.equal(out, ACT2FN["silu"](gate) * up)
    ref64 = gate.double() * torch.sigmoid(gate.double()) * up.double()
    torch.testing.assert_close(out.double(), ref64, atol=2e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


def test_odd_width_is_rejected():
    with pytest.raises(ValueError, match="even"):
        SiluAndMul()(torch.zeros(2, 5))
