"""The audit review's query parameters (GET /audit/events, GET /audit)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query

from service.usecases.audit_review import Filters


def _filters(patient: Annotated[str | None, Query(max_length=200)] = None,
             kind: Annotated[list[str] | None, Query(max_length=40)] = None,
             type: Annotated[list[str] | None, Query(max_length=40)] = None,
             outcome: Annotated[str | None, Query(max_length=40)] = None,
             since: Annotated[str | None, Query(max_length=40)] = None,
             until: Annotated[str | None, Query(max_length=40)] = None,
             limit: Annotated[int, Query(ge=1, le=500)] = 50,
             # bounded: SQLite's INTEGER is 64-bit (https://www.sqlite.org/datatype3.html), so a
             # larger offset would fail in the database rather than as a 400
             offset: Annotated[int, Query(ge=0, le=2**62)] = 0) -> Filters:
    return Filters(patient, kind, type, outcome, since, until, limit, offset)


AuditFilters = Annotated[Filters, Depends(_filters)]
