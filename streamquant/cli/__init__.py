"""The `streamquant` command line: one module per command (`load`, `generate`, `demo`, `quantize`,
`mismatch`), `main` (the parser assembly, dispatch to this process or the tensor-parallel ranks, and
the error lines), generate's `--prompts` rollouts (`rollout`), what commands accept (`input`) and
what they put out (`output`)."""
