"""Test helpers shared by the suites: an echo backend and frontend thread (frontend), paged-
attention cases and checks (kernels), a tiny random Llama (tiny_llama). On sys.path through
pytest's ``pythonpath`` setting; never installed with the package."""
