"""The MRI standards report on the review site (docs/report.md, "The report page"):

    GET /audit/report        the page: charts as inline SVG, the figures in tables, the breaches with
                             links to each patient's audit timeline
    GET /audit/report.csv    the report as `spinewatch report --format csv` writes it
    GET /audit/report.json   ... and as its JSON document

`since` / `until` are months (YYYY-MM), both included, as for the command. The sign-in is /audit's:
a browser without a session gets the token form (401), a download without credentials a bare 401.
Every report served is audited (`audit-access`, action `report`) as the command's is: it names the
patients of breaches.

The figures are service/usecases/report.py's; this module only lays them out. The charts are drawn
here, server-side, with SVG presentation attributes (fill, stroke, x, height): no script and no
`style` attribute, so the review site's Content-Security-Policy (service/api/pages.py) holds as it
is. CSP Level 3 governs `style` attributes and <style> elements (https://www.w3.org/TR/CSP3/), not
SVG presentation attributes (https://www.w3.org/TR/SVG2/styling.html#PresentationAttributes)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, ClassVar, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from service.api.deps import AuditDep, Reviewer, SettingsDep
from service.api.pages import reviewer_page
from service.api.reviewer import authorised
from service.api.routes.review_page import sign_in_form
from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.infra.audit.writer import AuditLog
from service.usecases.report import TIERS, access_detail, build_report, parse_month, read_records, render

router = APIRouter(tags=["audit"])

Since = Annotated[str | None, Query(description="first month, YYYY-MM (default: the first with data)")]
Until = Annotated[str | None, Query(description="last month, YYYY-MM, included (default: this month)")]
# Ten years a page: a slip in the year (0026-10) is refused rather than laid out over 2,000 years.
MAX_MONTHS = 120
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json"}
TIER_LABELS = {"emergency": "emergency (24 h)", "urgent": "urgent (7 days)"}
TIER_COLOURS = {"emergency": "#c9302c", "urgent": "#d98a1c"}
P90_COLOURS = {"emergency": "#eba5a3", "urgent": "#f3cd8e"}  # the same hue, lighter: p90 beside the median

# Chart geometry, in px: a group of two bars per month, the plot between the axis labels and the
# target's label, the month names and the legend underneath.
PLOT_TOP, PLOT_HEIGHT, PLOT_LEFT = 24, 160, 56
BAR, GAP, PAD = 40, 8, 12
GROUP = PAD + BAR + GAP + BAR + PAD
RIGHT_MARGIN, BOTTOM_MARGIN = 84, 48


@dataclass(frozen=True)
class Bar:
    x: float
    y: float  # the top
    height: float
    fill: str
    label: str  # drawn above the bar: "67%", "30 h", "no data"
    title: str  # the bar's tooltip and accessible name


@dataclass(frozen=True)
class Line:
    y: float
    label: str


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    desc: str
    months: list[tuple[float, str]]  # (centre x, month)
    ticks: list[Line]
    bars: list[Bar]
    legend: list[tuple[str, str]]  # (fill, label)
    target: Line | None = None
    left: ClassVar[int] = PLOT_LEFT
    top: ClassVar[int] = PLOT_TOP
    bar_width: ClassVar[int] = BAR

    @property
    def right(self) -> int:
        return PLOT_LEFT + GROUP * len(self.months)

    @property
    def baseline(self) -> int:
        return PLOT_TOP + PLOT_HEIGHT

    @property
    def width(self) -> int:
        return self.right + RIGHT_MARGIN

    @property
    def height(self) -> int:
        return self.baseline + BOTTOM_MARGIN


def percent(share: float | None) -> str:
    return "no data" if share is None else f"{share * 100:.0f}%"


def hours(value: float | None) -> str:
    return "no data" if value is None else f"{value:g}"


def _slot_x(month_index: int, slot: float) -> float:
    return PLOT_LEFT + month_index * GROUP + PAD + slot * (BAR + GAP)


def _bar(month_index: int, slot: float, fraction: float | None, fill: str, label: str, title: str) -> Bar:
    """A bar `fraction` (0-1) of the plot high; without a value (or below 0), none: only its label."""
    height = 0.0 if fraction is None else round(max(fraction, 0.0) * PLOT_HEIGHT, 1)
    return Bar(_slot_x(month_index, slot), PLOT_TOP + PLOT_HEIGHT - height, height, fill, label, title)


def _months(report: dict) -> list[str]:
    return list(dict.fromkeys(row["month"] for row in report["rows"]))


def _centres(months: list[str]) -> list[tuple[float, str]]:
    return [(PLOT_LEFT + i * GROUP + GROUP / 2, month) for i, month in enumerate(months)]


def share_chart(report: dict) -> Chart:
    """Per month, each tier's share of patients whose MRI came within its target."""
    rows = {(r["month"], r["tier"]): r for r in report["rows"]}
    months = _months(report)
    bars, said = [], []
    for i, month in enumerate(months):
        parts = []
        for slot, tier in enumerate(TIERS):
            row = rows[(month, tier)]
            share = row["met_share"]
            figure = "no data" if share is None else f"{percent(share)} ({row['met']} of {row['denominator']})"
            bars.append(_bar(i, slot, share, TIER_COLOURS[tier], percent(share),
                             f"{month}, {tier}, MRI within {row['target_hours']} h: {figure}"))
            parts.append(f"{tier} {figure}")
        said.append(f"{month}: " + ", ".join(parts))
    ticks = [Line(PLOT_TOP + PLOT_HEIGHT * (1 - share), f"{share * 100:.0f}%") for share in (0, 0.5, 1)]
    return Chart("chart-share", "Share of patients with an MRI within target, per month and tier",
                 "; ".join(said) + ".", _centres(months), ticks, bars,
                 [(TIER_COLOURS[tier], TIER_LABELS[tier]) for tier in TIERS])


def hours_scale(target: int, values: list[float]) -> tuple[float, float]:
    """(top of the axis, tick step) in hours: room for 1.5 x the target and the largest value, ticks
    every half target, the step doubled until there are at most 8."""
    step = target / 2
    top = max([target * 1.5, *values])
    while top / step > 8:
        step *= 2
    return math.ceil(top / step) * step, step


def hours_chart(report: dict, tier: str) -> Chart:
    """Per month, one tier's median and p90 hours from first evidence to the MRI, against its target."""
    rows = {r["month"]: r for r in report["rows"] if r["tier"] == tier}
    months = _months(report)
    target = rows[months[0]]["target_hours"]
    values = [rows[m]["mri_hours"][part] for m in months for part in ("median", "p90")]
    top, step = hours_scale(target, [v for v in values if v is not None])
    bars, said = [], []
    for i, month in enumerate(months):
        mri = rows[month]["mri_hours"]
        if not mri["n"]:  # one "no data" across the month's two places
            bars.append(_bar(i, 0.5, None, TIER_COLOURS[tier], "no data", f"{month}, {tier}: no MRI done"))
            said.append(f"{month}: no data")
            continue
        for slot, (part, fills) in enumerate((("median", TIER_COLOURS), ("p90", P90_COLOURS))):
            label = f"{hours(mri[part])} h"
            bars.append(_bar(i, slot, mri[part] / top, fills[tier], label,
                             f"{month}, {tier}: {part} {label} to MRI (n = {mri['n']})"))
        said.append(f"{month}: median {hours(mri['median'])} h, p90 {hours(mri['p90'])} h (n = {mri['n']})")
    ticks = [Line(PLOT_TOP + PLOT_HEIGHT * (1 - k * step / top), f"{k * step:g} h")
             for k in range(int(top / step) + 1)]
    return Chart(f"chart-hours-{tier}", f"Hours from first evidence to MRI, {tier}: median and p90 against the "
                 f"{target} h target", f"Target {target} h. " + "; ".join(said) + ".", _centres(months), ticks, bars,
                 [(TIER_COLOURS[tier], "median"), (P90_COLOURS[tier], "p90 (90th percentile)")],
                 target=Line(PLOT_TOP + PLOT_HEIGHT * (1 - target / top), f"target {target} h"))


def months_asked(since: str | None, until: str | None) -> tuple[str | None, str | None]:
    """`since` / `until` as the command takes them, or InvalidRequest. The message names the
    parameter, not the value given."""
    months = {}
    for name, value in (("since", since), ("until", until)):
        try:
            months[name] = parse_month(value) if value else None
        except ValueError:
            raise InvalidRequest(f"{name}: expected a month as YYYY-MM") from None
    if months["since"] and months["until"] and months["since"] > months["until"]:
        raise InvalidRequest(f"since ({months['since']}) is after until ({months['until']})")
    this_month = datetime.now(timezone.utc).strftime("%Y-%m")
    if _month_number(months["until"] or this_month) - _month_number(months["since"] or this_month) >= MAX_MONTHS:
        raise InvalidRequest(f"at most {MAX_MONTHS} months at a time")
    return months["since"], months["until"]


def _month_number(month: str) -> int:
    return int(month[:4]) * 12 + int(month[5:]) - 1


def audited_report(audit: AuditLog, settings: Settings, since: str | None, until: str | None, format: str) -> dict:
    report = build_report(read_records(audit.store, since), now=datetime.now(timezone.utc), since=since,
                          until=until, review_base=settings.public_base_url or "")
    audit.record("audit-access", "success", actor="reviewer", detail=access_detail(report, format))
    return report


@router.get("/audit/report", response_class=HTMLResponse)
def report_page(request: Request, settings: SettingsDep, audit: AuditDep, since: Since = None, until: Until = None):
    if not authorised(request, settings, audit):
        return sign_in_form(request)
    try:
        first, last = months_asked(since, until)
    except InvalidRequest as exc:
        return reviewer_page("report.html", 400, error=exc.message, since=since, until=until)
    report = audited_report(audit, settings, first, last, "html")
    return reviewer_page("report.html", report=report, since=report["since"], until=report["until"], percent=percent,
                         hours=hours, charts=[share_chart(report), *(hours_chart(report, tier) for tier in TIERS)])


@router.get("/audit/report.{format}")
def report_download(format: Literal["csv", "json"], reviewer: Reviewer, settings: SettingsDep, audit: AuditDep,
                    since: Since = None, until: Until = None) -> Response:
    report = audited_report(audit, settings, *months_asked(since, until), format)
    filename = f"spinewatch-report-{report['since']}-{report['until']}.{format}"
    return Response(render(report, format), media_type=MEDIA_TYPES[format],
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})
