"""The semi-PD worker: a prefill lane and a decode lane in one process over one KV storage; a handoff moves block ids, not bytes; each lane computes in its own SM share."""
