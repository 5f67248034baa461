"""Multi-node placement: which node a worker of a role goes on, and the Ray side that watches nodes."""
