"""The `streamquant` command line: `main` (the parser and the `load`, `generate`, `demo` commands),
one module per other command (`quantize`, `mismatch`), generate's `--prompts` rollouts (`rollout`),
what commands accept (`input`) and print (`output`)."""
