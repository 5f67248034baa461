"""KV blocks: block hashes, the per-tier block pool, and the CPU tier behind the device pool."""
