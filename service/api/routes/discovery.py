"""GET /cds-services: CDS Hooks 2.0 discovery (index.html#discovery). Authenticated like every call."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import VerifiedClient
from service.api.models.discovery import SERVICES

router = APIRouter(tags=["cds-hooks"])


@router.get("/cds-services")
async def discovery(client: VerifiedClient) -> dict:
    return {"services": SERVICES}
