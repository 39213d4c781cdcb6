"""Falcon (or any local HuggingFace causal LM) server: `python inference_api.py [flags]`."""

import presets.process.omp_spin  # noqa: F401  (first: it sets OpenMP up before torch loads)
from presets.servers.hf import main

if __name__ == "__main__":
    main()
