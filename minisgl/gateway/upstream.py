"""The gRPC side of the gateway: one channel to the server and its calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minisgl.gateway.errors import BadRequest
from minisgl.server.security import AUTH_HEADER, TlsFiles
from minisgl.v1 import generation_pb2, generation_pb2_grpc, model_pb2, model_pb2_grpc


@dataclass(frozen=True)
class Credentials:
    """How the gateway calls the server: over TLS or not, and with which key (its own, from
    --target-api-key: the clients' keys are checked by the gateway, never forwarded)."""

    tls: TlsFiles | None = None
    """None: plaintext; otherwise TLS, verified with `ca` (the system CAs without it), and a
    client certificate when `cert` and `key` are set (a server with mTLS)."""
    api_key: str | None = field(default=None, repr=False)

    def channel(self, target: str) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(target)
        creds = grpc.ssl_channel_credentials(self.tls.ca, self.tls.key, self.tls.cert)
        return grpc.aio.secure_channel(target, creds)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self.api_key is None else ((AUTH_HEADER, f"Bearer {self.api_key}"),)


class Upstream:
    """A client of the `minisgl serve` gRPC server at `target` (made inside the event loop)."""

    def __init__(self, target: str, credentials: Credentials | None = None) -> None:
        creds = credentials or Credentials()
        self.metadata = creds.metadata()
        self.channel = creds.channel(target)
        self.generation = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.models = model_pb2_grpc.ModelServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self._model: str | None = None
        self.context_length = 0

    async def model_name(self) -> str:
        if self._model is None:
            info = await self.models.GetModelInfo(
                model_pb2.GetModelInfoRequest(), timeout=10, metadata=self.metadata
            )
            self._model, self.context_length = info.model, info.context_length
        return self._model

    async def check_model(self, body: dict[str, Any]) -> str:
        """The served model's name; a 404 if the body's `model` names another."""
        asked = body.get("model")
        if asked is not None and not isinstance(asked, str):
            raise BadRequest("model: must be a string", "model")
        served = await self.model_name()
        if asked not in (None, "", served):
            raise BadRequest(
                f"model: {asked!r} is not served here (this is {served!r})", "model", 404
            )
        return served

    async def generate(self, fields: dict[str, Any]) -> generation_pb2.GenerateResponse:
        request = generation_pb2.GenerateRequest(**fields)
        return await self.generation.Generate(request, metadata=self.metadata)

    def stream(self, fields: dict[str, Any]) -> Any:
        """The StreamGenerate call (read() it until grpc.aio.EOF; cancel() it to abort)."""
        request = generation_pb2.StreamGenerateRequest(**fields)
        return self.generation.StreamGenerate(request, metadata=self.metadata)

    async def healthy(self) -> bool:
        try:
            resp = await self.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self.channel.close(grace=None)
