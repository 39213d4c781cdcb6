"""Llama (Llama 2 and 3, SmolLM2, ...): our model, Meta and HuggingFace checkpoints, tokenizers, CPU kernels,
the step engine over a paged KV cache."""
