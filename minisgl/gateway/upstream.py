"""The gRPC side of the gateway: one channel to the server and its calls."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minisgl.gateway.errors import BadRequest
from minisgl.v1 import generation_pb2, generation_pb2_grpc, model_pb2, model_pb2_grpc


class Upstream:
    """A client of the `minisgl serve` gRPC server at `target` (made inside the event loop)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.generation = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.models = model_pb2_grpc.ModelServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self._model: str | None = None
        self.context_length = 0

    async def model_name(self) -> str:
        if self._model is None:
            info = await self.models.GetModelInfo(model_pb2.GetModelInfoRequest(), timeout=10)
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
        return await self.generation.Generate(generation_pb2.GenerateRequest(**fields))

    def stream(self, fields: dict[str, Any]) -> Any:
        """The StreamGenerate call (read() it until grpc.aio.EOF; cancel() it to abort)."""
        return self.generation.StreamGenerate(generation_pb2.StreamGenerateRequest(**fields))

    async def healthy(self) -> bool:
        try:
            resp = await self.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self.channel.close(grace=None)
