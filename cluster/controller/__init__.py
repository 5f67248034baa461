"""The controller: worker registry and health, the request table (flights), routing a request to its workers, the PD handoff, admin."""
