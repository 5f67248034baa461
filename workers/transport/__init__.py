"""KV transport between workers: pairwise channels, wire format, staging buffers, CUDA IPC."""
