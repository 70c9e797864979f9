"""The tensor-parallel layers models are made of (vLLM's names): parallel linear layers (`linear`), the
vocab embedding and LM head (`vocab`), fused MoE experts (`moe`), attention with its KV cache
(`attention`), norms, rotary embeddings and activations. Each weight-bearing layer asks its quant
method to create, process and apply its weights."""
