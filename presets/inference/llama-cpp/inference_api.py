"""llm-api compatible server (GGUF models on llama.cpp): `python inference_api.py [--config config.yaml]`."""

from presets.servers.llm_api import main

if __name__ == "__main__":
    main()
