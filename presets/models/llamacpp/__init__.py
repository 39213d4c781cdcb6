"""GGUF models of the Llama family on llama.cpp (llm-api's server)."""
