"""Pure quantization math: tensors in, tensors out, no modules and no state; imports only torch (and
the native kernels' build). Scale granularity and tensor-parallel windows (`granularity`), the code
formats (`code_format`), the formula modes (`formula`), amax / scales / codes / dequantization
(`quantize`) running on the native CPU kernels (`native`) or pure torch (`torch_kernels`), fp8 to
float32 (`convert`), asymmetric int4 and its packing (`int4`, `int4_pack`), and matmuls whose
result may be wider than their inputs (`matmul`)."""
