"""kvrelay.proto."""
