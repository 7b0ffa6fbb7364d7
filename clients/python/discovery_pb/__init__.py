"""Generated protobuf and gRPC stubs for discovery.v1 (see scripts/gen_proto.py).

Kept outside ``discovery`` so clients import them with only grpcio and protobuf installed.
"""
