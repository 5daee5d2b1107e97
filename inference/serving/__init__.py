"""Serving: the model registry (versions, their states, routing of reads), the repository watcher and the runner
factory that builds, warms up and starts a version's runner."""
