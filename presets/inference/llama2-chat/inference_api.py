"""Llama-2 chat server: `python inference_api.py [flags]` or `torchrun ... inference_api.py [flags]`."""

from presets.llama2.server import main

if __name__ == "__main__":
    main("chat")
