"""The server process: settings from flags, logging, the device, process groups and torchrun ranks, SIGTERM
drain and exit."""
