"""Generated gRPC stubs for proto/npcd/v1/npcd.proto (scripts/gen_proto.py writes them; do not edit)."""
