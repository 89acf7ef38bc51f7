"""Options of the gRPC server process (the engine's own are in minisgl.config.EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the frontend listens, and its limits."""

    host: str = "127.0.0.1"
    port: int = 50051
    max_queued_requests: int = 1024
    """Requests waiting for their first token beyond which new ones get RESOURCE_EXHAUSTED."""
    shutdown_grace_s: float = 30.0
    """After SIGTERM, how long in-flight requests may take to finish."""
    max_message_bytes: int = 64 * 2**20
    """Largest gRPC message accepted or sent."""
    max_connection_age_s: float = 1800.0
    """Connections are closed (gracefully) after this long, so load balancers can rebalance."""
    log_level: str = "INFO"
