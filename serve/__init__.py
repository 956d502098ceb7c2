"""gRPC serving of the Generator as the ln3diff.v1 service: `python -m serve` runs it, `serve.client` calls it."""
