"""Quantization: the method protocols every weight-bearing layer delegates to (`base`), the unquantized
methods (`unquantized`), the MoE expert layout and reference computation (`experts`), the scaled-code
methods of every code format (`scaled/`), torchao configs as online schemes (`torchao`), the
quantization error log (`error_log`), and the pure math under all of them (`math/`)."""
