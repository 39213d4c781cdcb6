"""Developer tools: tiny checkpoints, benchmark."""
