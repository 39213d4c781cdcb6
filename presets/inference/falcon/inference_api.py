"""Falcon (or any local HuggingFace causal LM) server: `python inference_api.py [flags]`."""

from presets.hf.server import main

if __name__ == "__main__":
    main()
