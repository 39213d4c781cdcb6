"""Continuous batching, model-agnostic: sequences and the scheduler, KV blocks, the engine thread, sampling,
structured output, the runtime the routes await."""
