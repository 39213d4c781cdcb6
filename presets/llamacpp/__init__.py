"""llm-api compatibility: GGUF models of the Llama family on llama.cpp, configured by config.yaml."""
