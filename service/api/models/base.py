from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Open(BaseModel):
    """A CDS Hooks body: unknown fields and `extension` are accepted (CDS Hooks 2.0 §Extensions)."""

    model_config = ConfigDict(extra="allow")
