"""streamquant: load Hugging Face checkpoints into tensor-parallel PyTorch models (vLLM vocabulary).

Public API (see README.md):
    load_model(path, *, quantization=None, dtype=torch.bfloat16, device="cpu", tp=None, strict=True,
               streaming=True, **options)
    reload_weights(model, weights, *, strict=True, atomic=False, staging_budget=None, quantized_source=None)
    begin_update(model, *, atomic=False, expected=None) -> WeightUpdate: .load(name, tensor), .load_many(pairs),
        .finish(expected_fingerprint=None), .abort()  (push-style refit; reload_weights is a pull over it)
    weights_fingerprint(model) -> hex SHA-256 of the model's kernel-format tensors over its TP group
    quantize_checkpoint(src, dst, quantization, *, format="compressed-tensors", workers=1, **options)
    (and `streamquant.offline`: QuantizePlan / quantize_weights, trainer-side quantization)
    (and `streamquant.rl.sync`: WeightSender / WeightReceiver, trainer -> inference over torch.distributed)
    generate(model, prompts, SamplingParams(...))  -> list[Completion] (rollouts; ragged prompts)
    generate(model, input_ids, max_new_tokens)     -> [B, T + max_new_tokens] ids (greedy)
    PeakMemorySampler(device)
    (and `streamquant.parallel.launch.launch(fn, tp_size, *args, device="cpu")`: N tensor-parallel
    ranks, one process each)

The names above are resolved on first use (PEP 562), so importing one subpackage, e.g.
`streamquant.layers`, does not pull in the checkpoint reader and transformers.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType

__version__ = "0.1.0"

_EXPORTS = MappingProxyType(
    {
        "load_model": "streamquant.api",
        "LoadReport": "streamquant.api",
        "generate": "streamquant.inference.generation",
        "generate_with_logits": "streamquant.inference.generation",
        "Completion": "streamquant.inference.generation",
        "SamplingParams": "streamquant.inference.sampling",
        "LaunchError": "streamquant.parallel.launch",
        "PeakMemorySampler": "streamquant.memory",
        "MemoryPeak": "streamquant.memory",
        "TPContext": "streamquant.parallel.context",
        "reload_weights": "streamquant.reload",
        "Reloader": "streamquant.reload",
        "begin_update": "streamquant.update",
        "WeightUpdate": "streamquant.update",
        "WeightUpdateError": "streamquant.update",
        "weights_fingerprint": "streamquant.fingerprint",
        "weights_digests": "streamquant.fingerprint",
        "ModelNotReadyError": "streamquant.models.base",
        "quantize_checkpoint": "streamquant.offline",
        "QuantizeReport": "streamquant.offline",
    }
)

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'streamquant' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
