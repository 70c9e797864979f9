"""The errors a checkpoint that does not fit its model raises (all `WeightLoadError`, a `ValueError`)."""

from __future__ import annotations


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


class UnexpectedWeightError(WeightLoadError):
    """A checkpoint tensor has no parameter in the model."""


class DuplicateWeightError(WeightLoadError):
    """A checkpoint tensor arrived twice, or two tensors wrote the same elements."""


class MissingWeightsError(WeightLoadError):
    """Some parameters were not (fully) written when the checkpoint ended."""


class WeightDtypeError(WeightLoadError):
    """A checkpoint tensor's dtype is not one a weight can be loaded from (integer, bool, fp8 codes)."""


class NonFiniteWeightError(WeightLoadError):
    """A checkpoint weight holds NaN or Inf, found when its layer was processed.

    `param` is the parameter's name as its module holds it ("weight"), `index` the position of
    one non-finite element in it; a load session turns them into the checkpoint tensor's name.
    """

    def __init__(self, message: str, *, param: str = "", index: tuple[int, ...] = ()):
        super().__init__(message)
        self.param = param
        self.index = index
