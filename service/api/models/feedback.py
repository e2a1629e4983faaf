"""CDS Hooks 2.0 feedback (index.html#feedback): what became of a card."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from fhir_mappings.cds.wording import OVERRIDE_SYSTEM, PATIENT_DECLINED
from service.api.models.base import Open


class Coding(Open):
    code: str = Field(min_length=1)
    system: str | None = None
    display: str | None = None


class OverrideReason(Open):
    reason: Coding | None = None
    userComment: str | None = None  # free text: accepted, never stored


class AcceptedSuggestion(Open):
    id: str = Field(min_length=1)


class Feedback(Open):
    card: str = Field(min_length=1, max_length=200)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: datetime

    @model_validator(mode="after")
    def _consistent(self) -> "Feedback":
        if self.outcome == "accepted" and not self.acceptedSuggestions:
            raise ValueError("acceptedSuggestions is required for accepted outcomes")
        if self.outcome == "overridden" and self.acceptedSuggestions:
            raise ValueError("an overridden card has no accepted suggestions")
        if self.outcomeTimestamp.tzinfo is None:
            raise ValueError("outcomeTimestamp must be UTC (RFC 3339 with Z or an offset)")
        return self

    def declined_mri(self) -> bool:
        """Overridden because the patient declined the MRI (the card's own override reason; a client
        that drops the Coding's system still means it)."""
        reason = self.overrideReason.reason if self.overrideReason else None
        return (self.outcome == "overridden" and reason is not None and reason.code == PATIENT_DECLINED
                and reason.system in (OVERRIDE_SYSTEM, None))

    def audit_detail(self, service_id: str) -> dict[str, Any]:
        """The `feedback` audit record's detail: references and codes only (never userComment)."""
        detail: dict[str, Any] = {"service": service_id, "card": self.card,
                                  "outcomeTimestamp": self.outcomeTimestamp.isoformat()}
        if self.acceptedSuggestions:
            detail["acceptedSuggestions"] = [s.id for s in self.acceptedSuggestions]
        if self.overrideReason and self.overrideReason.reason:
            reason = self.overrideReason.reason
            detail["overrideReason"] = {"system": reason.system, "code": reason.code}
        return detail


class FeedbackRequest(Open):
    feedback: list[Feedback] = Field(min_length=1)
