"""Test helpers shared by the suites: an echo backend and frontend thread (frontend), paged-
attention cases and checks (kernels). On sys.path through pytest's ``pythonpath`` setting; never
installed with the package."""
