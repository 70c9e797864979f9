"""Checkpoint-name -> parameter-name mapping, as data.

A model declares a `WeightMapping`: rules that rewrite whole dot-separated name segments (never
substrings), each carrying the keyword arguments its `weight_loader` needs (`shard_id`,
`expert_id`), plus patterns of checkpoint tensors to skip (e.g. `rotary_emb.inv_freq`, or
`lm_head.weight` when the embeddings are tied). The segment `{expert}` in a rule matches an
integer and passes it on as `expert_id`. `leaf_aliases` name the parameter a quantized format's
tensor fills under another last segment (compressed-tensors' packed int4 `X.weight_packed` is the
codes `X.weight`; hf-fp8's `X.weight_scale_inv` is `X.weight_scale`), so errors still name the
checkpoint's own tensor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

EXPERT = "{expert}"


def _segments(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


def _find(name: tuple[str, ...], pattern: tuple[str, ...]) -> tuple[int, int | None] | None:
    """Index where `pattern` occurs as whole segments in `name`, and the captured expert id."""
    n = len(pattern)
    for start in range(len(name) - n + 1):
        expert = None
        for seg, pat in zip(name[start : start + n], pattern):
            if pat == EXPERT and seg.isdigit():
                expert = int(seg)
            elif seg != pat:
                break
        else:
            return start, expert
    return None


@dataclass(frozen=True)
class MappingRule:
    """Replace the segments `checkpoint` by `param` and call the loader with `kwargs`."""

    checkpoint: str
    param: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, checkpoint: str, param: str, **kwargs: Any) -> "MappingRule":
        return cls(checkpoint, param, tuple(sorted(kwargs.items())))

    @functools.cached_property
    def _pattern(self) -> tuple[str, ...]:
        return _segments(self.checkpoint)

    @functools.cached_property
    def _literals(self) -> frozenset[str]:
        """The rule's fixed segments: a name lacking one cannot match (the cheap test most names fail)."""
        return frozenset(p for p in self._pattern if p != EXPERT)

    def apply(self, name: str) -> tuple[str, dict[str, Any]] | None:
        return self.apply_segments(_segments(name))

    def apply_segments(self, segs: tuple[str, ...]) -> tuple[str, dict[str, Any]] | None:
        """`apply` for a name already split into its segments."""
        pattern = self._pattern
        if not self._literals.issubset(segs):
            return None
        found = _find(segs, pattern)
        if found is None:
            return None
        start, expert = found
        new = segs[:start] + _segments(self.param) + segs[start + len(pattern) :]
        kwargs = dict(self.kwargs)
        if expert is not None:
            kwargs["expert_id"] = expert
        return ".".join(new), kwargs


@dataclass(frozen=True)
class WeightMapping:
    """Ordered rules (first match wins) and skip patterns; names that match nothing map to themselves.

    Each name is resolved once per mapping (a model holds one): a refit maps the same names every
    step, tens of thousands for an MoE model, and resolving one costs ~40 us of segment matching
    against every rule, a dict lookup after that.
    """

    rules: tuple[MappingRule, ...] = ()
    skip: tuple[str, ...] = ()
    prefix_renames: tuple[tuple[str, str], ...] = field(default=())
    leaf_aliases: tuple[tuple[str, str], ...] = (("weight_packed", "weight"), ("weight_scale_inv", "weight_scale"))
    # checkpoint name -> (skipped, parameter name, loader kwargs): what `_resolve` found for it
    _resolved: dict[str, tuple[bool, str, tuple[tuple[str, Any], ...]]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def should_skip(self, name: str) -> bool:
        return self._lookup(name)[0]

    def _lookup(self, name: str) -> tuple[bool, str, tuple[tuple[str, Any], ...]]:
        hit = self._resolved.get(name)
        if hit is None:
            hit = self._resolved[name] = self._resolve(name)
        return hit

    def _resolve(self, name: str) -> tuple[bool, str, tuple[tuple[str, Any], ...]]:
        segs = _segments(name)
        skipped = any(_find(segs, _segments(p)) is not None for p in self.skip)
        name = self.rename(name)
        segs = _segments(name)
        for alias, leaf in self.leaf_aliases:
            if segs[-1] == alias:
                segs = segs[:-1] + (leaf,)
                name = ".".join(segs)
        for rule in self.rules:
            hit = rule.apply_segments(segs)
            if hit is not None:
                return skipped, hit[0], tuple(hit[1].items())
        return skipped, name, ()

    def rename(self, name: str) -> str:
        """`name` with the first matching prefix rename applied (model-side prefix)."""
        for old, new in self.prefix_renames:
            if name.startswith(old + ".") and not name.startswith(new + "."):
                return new + name[len(old) :]
        return name

    def undo_rename(self, name: str) -> str:
        """The checkpoint-side form of a model-side name (inverse of `rename`)."""
        for old, new in self.prefix_renames:
            if name.startswith(new + "."):
                return old + name[len(new) :]
        return name

    def map(self, name: str) -> tuple[str, dict[str, Any]]:
        """(parameter name, keyword arguments of its weight loader) for checkpoint name `name`."""
        _, param, kwargs = self._lookup(name)
        return param, dict(kwargs)

    def checkpoint_names_for(self, param_name: str, num_experts: int | None = None, *, undo_renames: bool = True) -> list[str]:
        """The checkpoint names that feed `param_name` (for error messages about missing tensors).

        With `undo_renames` they are given in the checkpoint-side form of `prefix_renames`.
        """
        segs = _segments(param_name)
        names = []
        for rule in self.rules:
            found = _find(segs, _segments(rule.param))
            if found is None:
                continue
            start, _ = found
            ckpt = ".".join(segs[:start] + _segments(rule.checkpoint) + segs[start + len(_segments(rule.param)) :])
            if EXPERT in ckpt:
                names += [ckpt.replace(EXPERT, str(e)) for e in range(num_experts or 0)]
            else:
                names.append(ckpt)
        names = names or [param_name]
        return [self.undo_rename(n) for n in names] if undo_renames else names
