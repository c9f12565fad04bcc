"""Python clients of the tiergate gRPC API, sync and asyncio.

from tiergate.client import Client
with Client("127.0.0.1:50051", api_key="...") as c:   # tls_ca="ca.pem" for TLS
    answer = c.classify("where is my order", timeout=0.5)
    print(answer.label, answer.tier, answer.confidence)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc

from tiergate.v1 import classifier_pb2 as pb
from tiergate.v1 import classifier_pb2_grpc as pb_grpc

ClassifyResponse = pb.ClassifyResponse


def _request(text: str, task: str, risk_tags: Sequence[str], force_tier: str, max_tier: str,
             idempotency_key: str, client_id: str) -> pb.ClassifyRequest:  # fmt: skip
    return pb.ClassifyRequest(
        text=text,
        task=task,
        hints=pb.Hints(risk_tags=list(risk_tags), force_tier=force_tier, max_tier=max_tier),
        idempotency_key=idempotency_key,
        client_id=client_id,
    )


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", api_key),) if api_key else ()


def _credentials(
    tls_ca: str | Path | None, tls_cert: str | Path | None, tls_key: str | Path | None
) -> grpc.ChannelCredentials | None:
    """TLS when any of these is given: ``tls_ca`` the CA that signed the server's
    certificate (default: the system's roots); ``tls_cert`` and ``tls_key`` this
    client's own certificate, for mutual TLS."""
    if tls_ca is None and tls_cert is None and tls_key is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("mutual TLS needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca is not None else None,
        private_key=Path(tls_key).read_bytes() if tls_key is not None else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert is not None else None,
    )


class Client:
    """Blocking client; errors raise grpc.RpcError with the server's status and message."""

    def __init__(self, address: str, *, api_key: str | None = None,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None):  # fmt: skip
        creds = _credentials(tls_ca, tls_cert, tls_key)
        self.channel = (
            grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
        )
        self.stub = pb_grpc.ClassifierStub(self.channel)  # type: ignore[no-untyped-call]
        self.metadata = _metadata(api_key)

    def classify(self, text: str, *, task: str = "", risk_tags: Sequence[str] = (),
                 force_tier: str = "", max_tier: str = "", idempotency_key: str = "",
                 timeout: float | None = None) -> pb.ClassifyResponse:  # fmt: skip
        msg = _request(text, task, risk_tags, force_tier, max_tier, idempotency_key, "")
        response: pb.ClassifyResponse = self.stub.Classify(
            msg, timeout=timeout, metadata=self.metadata
        )
        return response

    def classify_batch(self, texts: Sequence[str], *, task: str = "",
                       timeout: float | None = None) -> list[pb.ClassifyResponse]:  # fmt: skip
        msg = pb.ClassifyBatchRequest(
            requests=[_request(t, task, (), "", "", "", "") for t in texts]
        )
        response = self.stub.ClassifyBatch(msg, timeout=timeout, metadata=self.metadata)
        return list(response.responses)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()


class AsyncClient:
    """asyncio client (grpc.aio); use ``async with``."""

    def __init__(self, address: str, *, api_key: str | None = None,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None):  # fmt: skip
        creds = _credentials(tls_ca, tls_cert, tls_key)
        self.channel = (
            grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
        )
        self.stub = pb_grpc.ClassifierStub(self.channel)  # type: ignore[no-untyped-call]
        self.metadata = _metadata(api_key)

    async def classify(self, text: str, *, task: str = "", risk_tags: Sequence[str] = (),
                       force_tier: str = "", max_tier: str = "", idempotency_key: str = "",
                       timeout: float | None = None) -> pb.ClassifyResponse:  # fmt: skip
        msg = _request(text, task, risk_tags, force_tier, max_tier, idempotency_key, "")
        response: pb.ClassifyResponse = await self.stub.Classify(
            msg, timeout=timeout, metadata=self.metadata
        )
        return response

    async def classify_batch(
        self, texts: Sequence[str], *, task: str = "", timeout: float | None = None
    ) -> list[pb.ClassifyResponse]:
        msg = pb.ClassifyBatchRequest(
            requests=[_request(t, task, (), "", "", "", "") for t in texts]
        )
        response = await self.stub.ClassifyBatch(msg, timeout=timeout, metadata=self.metadata)
        return list(response.responses)

    def stream(self) -> grpc.aio.StreamStreamCall[pb.ClassifyRequest, pb.ClassifyResponse]:
        """A ClassifyStream call: ``await call.write(ClassifyRequest)``, ``async for`` answers."""
        call: grpc.aio.StreamStreamCall[pb.ClassifyRequest, pb.ClassifyResponse] = (
            self.stub.ClassifyStream(metadata=self.metadata)
        )
        return call

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await self.close()
