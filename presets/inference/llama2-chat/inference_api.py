"""Llama-2 chat server: `python inference_api.py [flags]` or `torchrun ... inference_api.py [flags]`."""

import presets.process.omp_spin  # noqa: F401  (first: it sets OpenMP up before torch loads)
from presets.servers.llama import main

if __name__ == "__main__":
    main("chat")
