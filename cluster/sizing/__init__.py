"""SLO-aware pool sizing: how many workers prefill and how many decode, and the autosizer that applies it."""
