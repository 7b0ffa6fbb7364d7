"""The keys under the prefix that are no instance we serve: replication checkpoints and
election keys, which ``discovery.replication.state`` reads to say how fresh each region is,
and values that do not decode. Those are kept too, so that the view's key count matches
etcd's when a progress answer is confirmed (``revision``)."""

from __future__ import annotations


class MetaKeys:
    def __init__(self) -> None:
        self._values: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: bytes) -> bytes | None:
        return self._values.get(key)

    def set(self, key: bytes, value: bytes | None) -> None:
        """None: the key is gone, or now holds an instance we serve."""
        if value is None:
            self._values.pop(key, None)
        else:
            self._values[key] = value

    def clear(self) -> None:
        self._values.clear()
