"""Llama-2 on Meta checkpoints: model math, loading, tokenizer, chat format, step engine, routes."""
