"""FastAPI dependencies: the shared Gateway, the caller's identity, the chat service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.gateway.core.chat import ChatService
from services.gateway.core.identity import ANON_COOKIE, Identity, client_ip
from services.gateway.state import Gateway


async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def get_identity(request: Request, gw: GatewayDep) -> Identity:
    """Bearer key if given (401 if wrong), else the anonymous cookie identity; a new cookie
    (first visit, or a tampered one replaced) is set on the response by the middleware."""
    return await resolve_identity(request, gw)


async def resolve_identity(request: Request, gw: Gateway, *, cached: bool = False) -> Identity:
    """See get_identity; cached=True may give an unconfirmed key identity (see
    IdentityResolver.from_api_key)."""
    ip = client_ip(
        request.client.host if request.client else None,
        request.headers.get("x-forwarded-for"),
        gw.settings.trusted_proxy_networks,
    )
    auth = request.headers.get("authorization")
    if auth:
        return await gw.identity.from_api_key(auth, ip, cached=cached)
    identity, new_cookie = await gw.identity.anonymous(request.cookies.get(ANON_COOKIE), ip)
    if new_cookie:
        request.state.anon_cookie = new_cookie
    return identity


IdentityDep = Annotated[Identity, Depends(get_identity)]


async def get_chat(gw: GatewayDep) -> ChatService:
    return ChatService(gw)


ChatDep = Annotated[ChatService, Depends(get_chat)]
