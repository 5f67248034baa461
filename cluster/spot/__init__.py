"""Spot preemption: notice sources (Kubernetes, cloud metadata, admin), the pure migration planner and its executor."""
