"""Router: filters, weighted scorers, picker (DESIGN.md, Cluster: Router)."""
