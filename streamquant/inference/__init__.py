"""Using a loaded model: sampling parameters and the math of one step (`sampling`), and the decode
loop with the model's KV cache (`generation`: greedy `generate`, rollouts with logprobs)."""
