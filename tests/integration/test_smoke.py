from __future__ import annotations

from discovery_pb.v1 import lookup_pb2, registry_pb2, types_pb2


async def test_register_then_resolve(etcd, servers, connect) -> None:
    server = await servers.start(etcd)
    stubs = connect(server)
    reg = await stubs.registry.Register(
        registry_pb2.RegisterRequest(instance=types_pb2.Instance(service="web", address="10.0.0.1:80")), timeout=5
    )
    assert reg.revision > 0
    resp = await stubs.lookup.Resolve(lookup_pb2.ResolveRequest(service="web", min_revision=reg.revision), timeout=5)
    assert [e.instance.address for e in resp.endpoints] == ["10.0.0.1:80"]
    assert resp.revision >= reg.revision
