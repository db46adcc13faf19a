"""How a rayssd Serve application is deployed: hosts, replicas, batching and request limits.

Plain values, no Ray import: `jobs/serve.py` and `pipelines/serve/app.py` check a user's
settings before anything starts; `pipelines/serve/deployments.py` deploys them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ssd import config as C

DEFAULT_NAME = "rayssd"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PREFIX = re.compile(r"(/[A-Za-z0-9_.~-]+)+")


@dataclass(frozen=True)
class ServeSettings:
    """How the application is deployed; `from_config` takes the defaults from a `ServeConfig`."""

    name: str = DEFAULT_NAME  # the Serve application; one cluster serves several side by side
    route_prefix: str = "/"  # where its routes live: /detect, or /PREFIX/detect
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1  # detector replicas (ignored with `autoscale`)
    autoscale: tuple[int, int] | None = None  # (min, max) detector replicas
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    max_request_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    ingress_replicas: int = 1
    detector_cpus: float = 1.0  # per replica; torch gets max(1, int(detector_cpus)) threads
    ingress_cpus: float = 0.5

    @classmethod
    def from_config(cls, serve_cfg: C.ServeConfig, **overrides: Any) -> ServeSettings:
        """`serve_cfg` with the non-None `overrides` on top."""
        fields = {
            "host": serve_cfg.host,
            "port": serve_cfg.port,
            "max_batch_size": serve_cfg.max_batch_size,
            "batch_wait_timeout_s": serve_cfg.batch_wait_timeout_s,
            "max_request_bytes": serve_cfg.max_request_bytes,
            "max_image_pixels": serve_cfg.max_image_pixels,
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields).validated()

    def validated(self) -> ServeSettings:
        checks = [
            (
                bool(_NAME.fullmatch(self.name)),
                f"name {self.name!r}: expected 1-64 letters, digits, '_', '.' or '-', starting with a "
                "letter or digit",
            ),
            (
                self.route_prefix == "/" or bool(_PREFIX.fullmatch(self.route_prefix)),
                f"route prefix {self.route_prefix!r}: expected / or /PATH (letters, digits, '_.~-'; "
                "no trailing /)",
            ),
            (1 <= self.port <= 65535, f"port must be a TCP port (1..65535), got {self.port}"),
            (self.replicas >= 1, f"replicas must be >= 1, got {self.replicas}"),
            (self.ingress_replicas >= 1, f"ingress_replicas must be >= 1, got {self.ingress_replicas}"),
            (
                self.autoscale is None
                or (0 <= self.autoscale[0] <= self.autoscale[1] and self.autoscale[1] >= 1),
                f"autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale}",
            ),
            (self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}"),
            (
                self.batch_wait_timeout_s >= 0,
                f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}",
            ),
            (self.max_request_bytes >= 1, f"max_request_bytes must be >= 1, got {self.max_request_bytes}"),
            (self.max_image_pixels >= 1, f"max_image_pixels must be >= 1, got {self.max_image_pixels}"),
            (
                self.detector_cpus > 0 and self.ingress_cpus >= 0,
                "detector_cpus must be > 0 and ingress_cpus >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def url(self) -> str:
        """The application's base URL (its routes are ``URL/detect``, ``URL/healthz``, ...)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        prefix = "" if self.route_prefix == "/" else self.route_prefix
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}{prefix}"
