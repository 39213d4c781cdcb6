"""HuggingFace causal LMs (Falcon, HF-format Llama, ...) through transformers' generate."""
