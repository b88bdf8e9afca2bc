"""Python client for the continuity mesh's gateways (sync and async).

    from mesh_client import MeshClient

    with MeshClient(["http://desktop.lan:8000", "https://vps.example"], api_key=KEY) as mesh:
        print(mesh.chat("What is in my briefing?").response)
        for piece in mesh.stream("And the next step?"):
            print(piece, end="", flush=True)

The original SDK's conveniences keep their names (`MistralOrchestrator`,
`generate_response`, `load_session_context`, `save_conversation`).
"""

from mesh_client.aio import AsyncChatStream, AsyncMeshClient
from mesh_client.client import ChatStream, MeshClient, MistralOrchestrator
from mesh_client.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GatewayUnreachable,
    MeshClientError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
)

__all__ = [
    "AsyncChatStream",
    "AsyncMeshClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatStream",
    "ConflictError",
    "GatewayUnreachable",
    "MeshClient",
    "MeshClientError",
    "MistralOrchestrator",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "StreamError",
]
