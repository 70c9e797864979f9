"""Checkpoint tensors into parameters: the parameter classes and their weight loaders (`parameters`),
checkpoint-name mapping (`mapping`), exact completion (`region`, `coverage`), the value rule
(`validate`) and the errors (`errors`), the contract a quant method answers (`contract`), the strict
table-driven session (`session`) and `stream_weights`, the one driver of load and reload
(`streaming`), with memory management (`materialize`: meta <-> storage and the staging pool;
`offload`: high-precision staging in host memory). Imports nothing above it but `parallel` and `memory`."""
