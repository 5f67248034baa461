"""The kvrelay command: generate, serve, demo, node, and the client commands."""
