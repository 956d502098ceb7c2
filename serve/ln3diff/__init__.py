"""Generated protobuf packages, one folder per proto package (python -m serve.codegen)."""
