"""kvrelay.cluster."""
