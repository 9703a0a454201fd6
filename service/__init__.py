"""User-facing front ends: the `vqe` CLI, the HTTP API, jobs, executors, storage, web page."""
