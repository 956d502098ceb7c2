"""Generated ln3diff.v1 protobuf and gRPC stubs (python -m serve.codegen); never edited by hand."""
