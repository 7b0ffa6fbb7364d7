"""Shared test code, imported by conftest files and tests alike; it imports no conftest and
nothing under tests/ but itself: ``servers`` (real etcd fixtures' helpers, in-process servers,
stubs), ``regions`` (several peered regions in one process), ``helpers`` (waiting on
conditions, gRPC call helpers, Watch streams), ``clients`` (fast-failing client configs)."""
