"""Checkpoints on disk: find and order files, iterate (name, tensor) lazily, write synthetic ones.

``reader`` reads any Hugging Face checkpoint directory (or hub id); ``synthetic`` writes
deterministic random Llama checkpoints for the demo, benchmarks and tests. Nothing here knows
about streamquant's models: this package sits below ``loading`` in the import order.
"""

from streamquant.checkpoint.reader import (
    CheckpointError,
    checkpoint_bytes,
    checkpoint_files,
    iterate_weights,
    load_hf_config,
    resolve_checkpoint,
)
from streamquant.checkpoint.synthetic import (
    BENCH_SPEC,
    DEMO_SPEC,
    TINY_SPEC,
    SyntheticSpec,
    default_cache_dir,
    ensure_synthetic_checkpoint,
    write_synthetic_checkpoint,
)

__all__ = [
    "BENCH_SPEC",
    "DEMO_SPEC",
    "TINY_SPEC",
    "CheckpointError",
    "SyntheticSpec",
    "checkpoint_bytes",
    "checkpoint_files",
    "default_cache_dir",
    "ensure_synthetic_checkpoint",
    "iterate_weights",
    "load_hf_config",
    "resolve_checkpoint",
    "write_synthetic_checkpoint",
]
