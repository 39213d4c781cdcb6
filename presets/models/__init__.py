"""The models: the math, checkpoint loading and tokenizers of each family, and the engine that runs each."""
