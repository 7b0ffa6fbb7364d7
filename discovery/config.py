"""Server configuration: a frozen value object, read once at the entry point.

A TOML file may hold any field (``[server]`` table or top level); command-line flags win.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from discovery.errors import InvalidArgument
from discovery.keys import DEFAULT_PREFIX
from discovery.model import split_address, validate_region


@dataclass(frozen=True, slots=True)
class ServerConfig:
    region: str = ""
    listen: str = "127.0.0.1:7400"
    etcd: tuple[str, ...] = ("127.0.0.1:2379",)
    key_prefix: str = DEFAULT_PREFIX
    grace_seconds: float = 5.0  # in-flight calls get this long on SIGTERM
    etcd_timeout_seconds: float = 3.0  # every etcd operation, retries included
    etcd_keepalive_seconds: float = 1.0  # gRPC keep-alive towards etcd (hung member detection)
    watch_keepalive_seconds: float = 5.0  # Watch sends KEEPALIVE after this long idle
    max_wait_seconds: float = 30.0  # a min_revision wait without a deadline ends here
    history: int = 10_000  # changes kept for Watch resume
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def validate(self) -> ServerConfig:
        if not self.region:
            raise InvalidArgument("region", "required (--region or `region` in the config file)")
        validate_region(self.region)
        split_address(self.listen, "listen", allow_port_zero=True)
        if not self.etcd:
            raise InvalidArgument("etcd", "at least one HOST:PORT")
        for endpoint in self.etcd:
            split_address(endpoint, "etcd")
        if not self.key_prefix.startswith("/") or not self.key_prefix.endswith("/"):
            raise InvalidArgument("key_prefix", "must start and end with '/'")
        for name in (
            "grace_seconds",
            "etcd_timeout_seconds",
            "etcd_keepalive_seconds",
            "watch_keepalive_seconds",
            "max_wait_seconds",
        ):
            if getattr(self, name) <= 0:
                raise InvalidArgument(name, "must be > 0")
        if self.history < 1:
            raise InvalidArgument("history", "must be >= 1")
        if self.extra:
            raise InvalidArgument("config", f"unknown settings: {', '.join(sorted(self.extra))}")
        return self


def load(path: str | None, overrides: dict[str, Any]) -> ServerConfig:
    """Read the optional TOML file, apply the non-None ``overrides`` (flags), validate."""
    values: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise InvalidArgument("config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument("config", f"{path} is not valid TOML: {exc}") from None
        values.update(data.get("server", data))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("etcd"), str):
        values["etcd"] = tuple(e.strip() for e in values["etcd"].split(",") if e.strip())
    elif "etcd" in values:
        values["etcd"] = tuple(values["etcd"])
    known = {f.name for f in fields(ServerConfig)} - {"extra"}
    extra = {k: v for k, v in values.items() if k not in known}
    config = replace(ServerConfig(), **{k: v for k, v in values.items() if k in known}, extra=extra)
    return config.validate()
