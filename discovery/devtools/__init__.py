"""Dev and fault tooling: local etcd (``etcd``), server processes (``process``), processes that
die with their parent (``lifeline``), a whole local cluster (``cluster``, ``discovery dev``),
its control endpoint (``control``), the fault proxy between regions (``faultproxy``) and the
benches' common ending (``benchmain``).

Threads and subprocesses, for the command line (``discovery dev``, ``discovery drill``), the
drills, the tests and the benches; never imported by the serving path (tests/unit/test_layers.py).
"""
