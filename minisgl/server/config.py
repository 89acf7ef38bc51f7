"""Options of the gRPC server process (the engine's own are in minisgl.config.EngineConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from minisgl.server.security import TlsFiles

LogFormat = Literal["text", "json"]


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one request's input, checked by the frontend (server/convert.py) before
    anything is tokenized; beyond them a request gets INVALID_ARGUMENT naming the field."""

    max_stop_strings: int = 64
    """stopping.stop: most stop strings."""
    max_stop_string_chars: int = 1024
    """stopping.stop: most characters in one stop string."""
    max_chat_messages: int = 4096
    """prompt.chat: most messages."""
    max_role_chars: int = 64
    """prompt.chat[i].role: most characters in a role."""
    max_prompt_chars: int = 0
    """prompt.text, or the contents of prompt.chat summed: most characters; 0 means
    PROMPT_CHARS_PER_TOKEN per token of the context length."""

    def __post_init__(self) -> None:
        """Raise ValueError, naming the flag, on a limit below 1 (0 for --max-prompt-chars)."""
        names = ("max_stop_strings", "max_stop_string_chars", "max_chat_messages", "max_role_chars")
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
        if self.max_prompt_chars < 0:
            raise ValueError("--max-prompt-chars: must be >= 0 (0: 32 per context token)")

    def prompt_chars(self, context_length: int) -> int:
        """The most prompt characters for a model of `context_length` tokens."""
        return self.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * context_length


PROMPT_CHARS_PER_TOKEN = 32
"""Far more than any tokenizer's characters per token: a longer prompt cannot fit."""


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the frontend listens, and its limits."""

    host: str = "127.0.0.1"
    port: int = 50051
    max_queued_requests: int = 1024
    """Requests waiting for their first token beyond which new ones get RESOURCE_EXHAUSTED."""
    shutdown_grace_s: float = 30.0
    """After SIGTERM, how long in-flight requests may take to finish."""
    exit_grace_s: float = 5.0
    """After a worker dies (in-flight calls failed, health NOT_SERVING), how long the server
    still answers before it exits with code 1 so that its supervisor restarts it."""
    max_message_bytes: int = 64 * 2**20
    """Largest gRPC message accepted or sent."""
    max_connection_age_s: float = 1800.0
    """Connections are closed (gracefully) after this long, so load balancers can rebalance."""
    log_level: str = "INFO"
    log_format: LogFormat = "text"
    """text lines, or JSON lines (one object per record; request lines carry their fields)."""
    log_stats_interval_s: float = 10.0
    """While busy, the scheduler logs its throughput this often (0: never)."""
    metrics_port: int | None = None
    """Where Prometheus metrics are served over HTTP (/metrics, on --host); None: off."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    """Bounds on each request's input."""
    tls: TlsFiles | None = None
    """The port's certificate and key (None: plaintext); with a CA, clients must present a
    certificate it signed (mTLS)."""
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    """Keys a call must carry as `authorization: Bearer <key>` (all but grpc.health.v1);
    none: no key needed."""

    def __post_init__(self) -> None:
        """Raise ValueError, naming the flag, on a value the server cannot run with."""
        check_port(self.port)
        if not self.host:
            raise ValueError("--host: must be a host name or an address (0.0.0.0: all), not ''")
        if self.max_queued_requests < 1:
            raise ValueError(f"--max-queued-requests: must be >= 1, not {self.max_queued_requests}")
        if not 0 <= self.shutdown_grace_s < math.inf:
            grace = self.shutdown_grace_s
            raise ValueError(f"--shutdown-grace: must be a finite number >= 0, not {grace}")
        if not 0 <= self.exit_grace_s < math.inf:
            raise ValueError(f"--exit-grace: must be a finite number >= 0, not {self.exit_grace_s}")
        if self.max_message_bytes < 1:
            raise ValueError("--max-message-mib: must be >= 1")
        if not 0 < self.max_connection_age_s < math.inf:
            age = self.max_connection_age_s
            raise ValueError(f"--max-connection-age: must be a finite number > 0, not {age}")
        if self.metrics_port is not None:
            check_port(self.metrics_port, "--metrics-port")
            if self.metrics_port == self.port:
                raise ValueError(f"--metrics-port: {self.metrics_port} is the gRPC --port too")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"--log-format: must be text or json, not {self.log_format!r}")
        if not 0 <= self.log_stats_interval_s < math.inf:
            interval = self.log_stats_interval_s
            raise ValueError(f"--log-stats-interval: must be a finite number >= 0, not {interval}")


def check_port(port: int, flag: str = "--port") -> None:
    """Raise ValueError unless `port` is a TCP port one can listen on (1..65535)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"{flag}: must be in 1..65535, not {port}")
