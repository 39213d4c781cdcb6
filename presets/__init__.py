"""Containerized inference servers for open LLMs (Llama-2 text and chat), Kaito-compatible."""
