"""Permuting a parameter's storage layout (input/output/packed dims) in place."""

from __future__ import annotations

import torch


def permute_param_layout_(param: torch.nn.Parameter, input_dim: int, output_dim: int, **kwargs) -> torch.nn.Parameter:
    """Permute `param` so that its input dim sits at `input_dim` and its output dim at `output_dim`.

    A 2-D parameter that declares only one of the two dims gets the other inferred. `packed_dim`
    may be requested only where the packing already lies (this never re-packs).
    """
    cur_in = getattr(param, "input_dim", None)
    cur_out = getattr(param, "output_dim", None)
    if cur_in is None or cur_out is None:
        if param.dim() != 2:
            raise ValueError(
                f"permute_param_layout_ infers a missing input/output dim only for 2-D parameters, "
                f"got shape {tuple(param.shape)}"
            )
        if cur_in is None and cur_out is None:
            raise ValueError("permute_param_layout_ needs the parameter to declare input_dim or output_dim")
        cur_in = 1 - cur_out if cur_in is None else cur_in
        cur_out = 1 - cur_in if cur_out is None else cur_out
    perm = [d for d in range(param.dim()) if d not in (cur_in, cur_out)]
    for target, current in sorted(((input_dim, cur_in), (output_dim, cur_out))):
        perm.insert(target, current)
    if "packed_dim" in kwargs:
        packed = getattr(param, "packed_dim", None)
        if packed is None or packed != perm[kwargs["packed_dim"]]:
            raise ValueError("permute_param_layout_ does not re-pack: packed_dim must follow the permutation")
    param.data = param.data.permute(*perm)
    if hasattr(param, "input_dim"):
        param.input_dim = input_dim
    if hasattr(param, "output_dim"):
        param.output_dim = output_dim
    if getattr(param, "packed_dim", None) is not None:
        param.packed_dim = kwargs.get("packed_dim", perm.index(param.packed_dim))
    return param
