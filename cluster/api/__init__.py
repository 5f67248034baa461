"""The edge: gRPC and OpenAI HTTP frontends, auth, admission limits, request validation, and the ClusterBackend interface they call."""
