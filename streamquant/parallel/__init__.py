"""Tensor parallelism: the rank's context value and its collectives (`context`), and running a
function on N ranks, one process each, or under torchrun (`launch`, the parent's side; `rank`, each
rank process's)."""
