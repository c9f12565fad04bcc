"""Generated gRPC code for proto/tiergate/v1 (`make proto` writes it; not committed)."""
