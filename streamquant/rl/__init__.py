"""Tools for reinforcement-learning loops around a loaded model: trainer -> inference weight sync over
`torch.distributed` (`sync` sends, `receiver` receives, `protocol` is what they share; the flat-bucket
layout in `buckets`, failures in `errors`; delta sync: one tensor's change in `delta`, the copies both
sides keep of the last sync in `replica`) and the fp8-vs-bf16 policy mismatch probe (`mismatch`)."""
