"""Inside one worker: the engine step (schedule -> run model -> sample -> emit), its scheduler and policies, swap, its loop thread."""
