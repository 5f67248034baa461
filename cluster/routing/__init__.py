"""Where a request goes: the KV directory, the router (filters -> scorers -> picker), the cost model, and the controller's routing adapter."""
