"""The guard against destructive updates (Slack 2022; Nacos #4470): a server that suddenly
reports a service empty, or most of it gone, is more often wrong than right."""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import Any

from discovery_client.errors import ConfigError


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    """When to hold an update back instead of applying it to the cache.

    An update is destructive when it removes every instance of a service, or more than
    ``max_removal_share`` of them within one grace period (removals arriving one by one
    count together; instances are counted by key, whatever their status: marking DRAINING
    is not a removal). A destructive update is held for up to
    ``grace_seconds``, the cache answering from the previous view (``Resolution.held``), and
    applied at once if a fresh Resolve (on another server of the pool when one answers)
    confirms the removal; after the grace period it is applied anyway, as a genuine scale-down
    must take effect eventually.

    Args:
        enabled: False trusts the server: every update is applied as it arrives.
        max_removal_share: the largest share of a service's instances one update may remove
            without being held (0..1).
        grace_seconds: how long an unconfirmed destructive update is held.
    """

    enabled: bool = True
    max_removal_share: float = 0.5
    grace_seconds: float = 30.0

    def is_destructive(self, before: Set[Any], after: Set[Any]) -> bool:
        """Whether replacing the instance keys ``before`` by ``after`` must be held."""
        if not self.enabled or not before:
            return False
        removed = len(before - after)
        if removed == 0:
            return False
        return not after or removed / len(before) > self.max_removal_share

    def validate(self) -> GuardPolicy:
        if not 0 <= self.max_removal_share <= 1:
            raise ConfigError("guard: max_removal_share must be within 0..1")
        if self.grace_seconds < 0:
            raise ConfigError("guard: grace_seconds must be >= 0")
        return self


def confirms(removed: Set[Any], fresh: Set[Any]) -> bool:
    """Whether a fresh read (its instance keys ``fresh``) agrees that ``removed`` are gone."""
    return not (removed & fresh)
