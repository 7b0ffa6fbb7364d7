"""Status's replication figures: plain data from the domain, protobuf built by the API."""

from __future__ import annotations

import dataclasses

from discovery.api.admin import _origin_status
from discovery.replication.state import OriginState
from discovery_pb.v1.admin_pb2 import OriginStatus


def test_every_field_of_the_message_comes_from_the_plain_data() -> None:
    state = OriginState(
        origin="eu",
        connected=True,
        leader="b-1",
        checkpoint_revision=40,
        head_revision=42,
        lag_revisions=2,
        lag_seconds=0.25,
        last_contact_seconds=0.5,
        source="10.0.0.1:7400",
        replicas=3,
        heartbeat_seconds=0.5,
        warning="raise --stale-after",
    )
    names = {f.name for f in dataclasses.fields(OriginState)}
    assert names == set(OriginStatus.DESCRIPTOR.fields_by_name)  # a field added to one is added to both
    message = _origin_status(state)
    assert {name: getattr(message, name) for name in names} == dataclasses.asdict(state)
