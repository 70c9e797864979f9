"""Tools for reinforcement-learning loops around a loaded model: trainer -> inference weight sync over
`torch.distributed` (`sync`; its flat-bucket layout in `buckets`, its failures in `errors`) and the
fp8-vs-bf16 policy mismatch probe (`mismatch`)."""
