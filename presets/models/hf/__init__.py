"""HuggingFace causal LMs (Falcon and others) through transformers' generate."""
