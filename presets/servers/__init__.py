"""One module per server: it wires a model family's engine to the APIs it serves and runs the process."""
