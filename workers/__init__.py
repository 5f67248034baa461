"""kvrelay.workers."""
