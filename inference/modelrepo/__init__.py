"""Model repository: models/<name>/<version>/model.yaml, weights and model card."""
