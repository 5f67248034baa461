"""Running a cluster: the serve settings, the Ray actors, starting the frontends and the worker pools."""
