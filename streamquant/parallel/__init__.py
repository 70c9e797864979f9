"""Tensor parallelism: the rank's context value and its collectives (`context`), and running a
function on N ranks, one process each (`launch`, the parent's side; `rank`, each rank process's), or
under torchrun (`torchrun`)."""
