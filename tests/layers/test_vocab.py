"""Vocab-parallel embedding and LM head: sharded loading with zeroed pads, TP reassembly, tying.

TP > 1 is checked two ways: every rank built in one process (rank r of size s) with the partial
results reassembled by hand (sum for the embedding, concatenation for the head), and one real
two-process gloo run through the layers' own collectives.
"""


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from streamquant.layers.vocab import ParallelLMHead, VocabParallelEmbedding, pad_vocab_size, vocab_parallel_weight_loader
from streamquant.loading.coverage import Coverage
from streamquant.loading.errors import WeightLoadError
from streamquant.loading.streaming import stream_weights
from streamquant.loading.mapping import WeightMapping
from streamquant.parallel.context import TPContext
from streamquant.quant.base import EmbeddingMethod
from streamquant.quant.scaled.config import ScaledConfig, ScaledScheme
from streamquant.quant.unquantized import UnquantizedEmbeddingMethod

DIM = 8


class Toy(nn.Module):
    def __init__(self, vocab, tp=TPContext(), *, bias=False, tie=False, dtype=torch.float32):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(vocab, DIM, tp=tp, params_dtype=dtype, prefix="embed_tokens")
        self.lm_head = ParallelLMHead(vocab, DIM, bias=bias, tp=tp, params_dtype=dtype, prefix="lm_head")
        if tie:
            self.lm_head.tie_weights(self.embed_tokens)
        for p in self.parameters():
            p.data.fill_(float("nan"))  # NaN sentinel: anything the load leaves unwritten shows up


def checkpoint(vocab, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed_tokens.weight": torch.randn(vocab, DIM, generator=g).to(dtype),
        "lm_head.weight": torch.randn(vocab, DIM, generator=g).to(dtype),
        "lm_head.bias": torch.randn(vocab, generator=g).to(dtype),
    }


def test_pad_vocab_size():
    assert [pad_vocab_size(97, s) for s in (1, 2, 3, 4)] == [97, 98, 99, 100]
    assert pad_vocab_size(96, 4) == 96
    with pytest.raises(ValueError):
        pad_vocab_size(0, 2)


@pytest.mark.parametrize("vocab", [97, 96, 5])
@pytest.mark.parametrize("tp_size", [1, 2, 3, 4])
def test_ranks_reassemble_to_the_full_layers(vocab, tp_size):
    ckpt = checkpoint(vocab)
    ranks = [Toy(vocab, TPContext(r, tp_size), bias=True) for r in range(tp_size)]
    for model in ranks:
        stream_weights(model, ckpt.items(), WeightMapping(), device="cpu")  # strict: every element of every param written
    per = pad_vocab_size(vocab, tp_size) // tp_size
    for r, model in enumerate(ranks):
        for name in ckpt:
            param = model.get_parameter(name)
            assert param.shape[0] == per
            valid = max(0, min(per, vocab - r * per))
            assert torch.equal(param[:valid], ckpt[name][r * per : r * per + valid])
            assert torch.equal(param[valid:], torch.zeros_like(param[valid:]))  # pad zeroed over the NaNs

    ids = torch.tensor([[0, vocab - 1, 3 % vocab, vocab // 2], [1, 2 % vocab, vocab - 2, 0]])
    embedded = sum(m.embed_tokens.local_embedding(ids) for m in ranks)  # what all_reduce computes
    assert torch.equal(embedded, F.embedding(ids, ckpt["embed_tokens.weight"]))

    hidden = torch.randn(2, 3, DIM, generator=torch.Generator().manual_seed(9))
    logits = torch.cat([m.lm_head.local_logits(hidden) for m in ranks], dim=-1)[..., :vocab]  # all_gather
    expected = F.linear(hidden, ckpt["lm_head.weight"], ckpt["lm_head.bias"])
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)
    if tp_size == 1:
        assert torch.equal(ranks[0].embed_tokens(ids), embedded)
        assert ranks[0].lm_head(hidden).shape == (2, 3, vocab)
        torch.testing.assert_close(ranks[0].lm_head(hidden), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tp_size,rank", [(1, 0), (2, 1), (3, 2), (4, 3), (4, 0)])
def test_loader_regions_cover_the_whole_parameter(tp_size, rank):
    vocab = 97
    layer = VocabParallelEmbedding(vocab, DIM, tp=TPContext(rank, tp_size))
    layer.weight.data.fill_(float("nan"))
    regions = layer.weight.weight_loader(layer.weight, torch.randn(vocab, DIM))
    coverage = Coverage(layer.weight.shape)
    for region in regions:
        coverage.add(region, "embed_tokens.weight")
    assert coverage.complete
    assert not layer.weight.isnan().any()


def test_wrong_shape_names_expected_and_received():
    layer = VocabParallelEmbedding(97, DIM, tp=TPContext(1, 2))
    with pytest.raises(ValueError, match=r"expected checkpoint shape \[97, 8\], received \[98, 8\]"):
        vocab_parallel_weight_loader(layer.weight, torch.zeros(98, DIM), num_embeddings=97, tp=TPContext(1, 2))
    with pytest.raises(WeightLoadError, match="embed_tokens.weight"):
        stream_weights(Toy(97), [("embed_tokens.weight", torch.zeros(97, DIM + 1))], WeightMapping(), device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_lm_head_shares_storage(dtype):
    vocab = 97
    model = Toy(vocab, TPContext(1, 3), tie=True, dtype=dtype)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert model.lm_head.quant_method is model.embed_tokens.quant_method
    assert [n for n, _ in model.named_parameters()] == ["embed_tokens.weight"]
    ckpt = checkpoint(vocab, dtype=dtype)
    skip_head = WeightMapping(skip=("lm_head.weight",))
    stream_weights(model, [("embed_tokens.weight", ckpt["embed_tokens.weight"]), ("lm_head.weight", ckpt["lm_head.weight"])], skip_head, device="cpu")
    hidden = torch.randn(4, DIM).to(dtype)
    per = model.lm_head.num_embeddings_per_partition
    expected = F.linear(hidden, ckpt["embed_tokens.weight"][per : 2 * per])
    assert torch.equal(model.lm_head.local_logits(hidden), expected)


def test_tie_keeps_own_bias_and_rejects_mismatch():
    embedding = VocabParallelEmbedding(97, DIM)
    head = ParallelLMHead(97, DIM, bias=True)
    bias = head.bias
    head.tie_weights(embedding)
    assert head.bias is bias and head.weight is embedding.weight
    with pytest.raises(ValueError, match="cannot tie"):
        ParallelLMHead(98, DIM).tie_weights(embedding)
    with pytest.raises(ValueError, match="cannot tie"):
        ParallelLMHead(97, DIM, tp=TPContext(0, 2)).tie_weights(embedding)


def test_quant_config_supplies_the_embedding_method():
    config = ScaledConfig(ScaledScheme.FP8)  # embeddings stay unquantized under every scheme
    method = config.get_embedding_method("model.embed_tokens")
    assert isinstance(method, UnquantizedEmbeddingMethod) and isinstance(method, EmbeddingMethod)
    layer = VocabParallelEmbedding(10, DIM, quant_config=config, params_dtype=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.output_dim == 0


def _tp2_worker(vocab: int) -> int:
    """Both ranks check their shards against the full computation; returns the group size."""
    tp = TPContext.from_process_group()
    assert (tp.rank, tp.size) == (dist.get_rank(), dist.get_world_size())
    ckpt = checkpoint(vocab)
    untied, tied = Toy(vocab, tp, bias=True), Toy(vocab, tp, tie=True)
    stream_weights(untied, ckpt.items(), WeightMapping(), device="cpu")
    stream_weights(tied, [("embed_tokens.weight", ckpt["embed_tokens.weight"])], WeightMapping(), device="cpu")
    ids = torch.tensor([[0, vocab - 1, 50, 48], [49, 1, vocab - 2, 47]])
    hidden = torch.randn(2, 3, DIM, generator=torch.Generator().manual_seed(5))
    assert torch.equal(untied.embed_tokens(ids), F.embedding(ids, ckpt["embed_tokens.weight"]))
    expected = F.linear(hidden, ckpt["lm_head.weight"], ckpt["lm_head.bias"])
    torch.testing.assert_close(untied.lm_head(hidden), expected, atol=1e-6, rtol=1e-6)
    expected_tied = F.linear(hidden, ckpt["embed_tokens.weight"])
    torch.testing.assert_close(tied.lm_head(hidden), expected_tied, atol=1e-6, rtol=1e-6)
    return tp.size


def test_real_tp2_gloo_embedding_and_lm_head(ranks):
    assert ranks.run(_tp2_worker, 2, 97) == 2
