"""The scaled-code layer methods: weights stored as codes (fp8 e4m3, int8, packed int4, MXFP8) times
scales, for every such scheme. The schemes and their options (`config`), a layer's checkpoint-format
weight and the codes and scales derived from it (`weights`), the linear and MoE methods (`linear`,
`moe`), and reading codes back (`readback`)."""
