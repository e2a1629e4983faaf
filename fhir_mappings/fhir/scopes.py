"""The SMART scopes SpineWatch asks for: every FHIR interaction it makes with its own credentials,
written down as data, and the scope strings built from that list.

SMART App Launch 2.x, "Scopes for requesting FHIR resources"
(https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html): a backend service's scope is
`system/<Type>.<letters>`, the letters an in-order subset of `cruds`: c create; r read (read, vread,
instance history); u update (and patch); d delete; s search (type-level search and history). SMART
1.0 scopes are `.read` (= v2 `.rs`), `.write` (= v2 `.cud`) and `.*` (= v2 `.cruds`). SMART defines
no scope for operations: the ones SpineWatch calls only read (`Subscription/{id}/$status`,
`$events`, `CodeSystem/$subsumes`) and are counted as reads of their type. The capabilities
interaction (`GET [base]/metadata`) names no type: no scope covers it, and a server answers it before
any login (it is how a client discovers the server).

Where it matters the list follows the settings: Binary is read only when notes' text is fetched by
reference (SPINEWATCH_NOTE_MAX_BINARY_READS > 0); CodeSystem only when the terminology server is the
FHIR server (the only case it gets SpineWatch's token). The subscribed types are read one by one (a
notification's focus, a deleted resource's history) and searched (the sweeps); each is a type of the
record too, which every evaluation searches, DocumentReference and ClinicalImpression (clinical
notes) included, and reads again where a decision rested on one of them.

Pure: no I/O. service/infra/fhir/auth.py builds the default scope from the settings with it; the FHIR
client names the scope a refused request needed; `spinewatch check-config` names what an explicit
SPINEWATCH_SMART_SCOPE lacks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

ScopeVersion = Literal["v1", "v2"]
LETTERS = "cruds"  # the order SMART 2.x requires
VERBS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True)
class Use:
    resource_type: str
    letters: str  # in `cruds` order
    by: str  # what makes these interactions


# Whatever the settings. The record's types are those workers/pipeline/record.py `record_queries`
# searches; any of them may be read again, as a record an earlier decision rested on (retractions).
RECORD_TYPES = ("Condition", "ServiceRequest", "ImagingStudy", "Observation", "DiagnosticReport", "Procedure",
                "DocumentReference", "ClinicalImpression")
ALWAYS: tuple[Use, ...] = (
    Use("Patient", "r", "workers: the record starts with the patient; alerts: its generalPractitioner"),
    *(Use(t, "rs", "workers: the patient's record, and a record an earlier decision rested on") for t in RECORD_TYPES),
    Use("CareTeam", "s", "alerts: the recipients"),
    Use("Communication", "cs", "alerts: the Communication found by its identifier, else created"),
    Use("Subscription", "crus", "subscribe: search, create, update, read; watchdog: read, $status, $events, "
                                "re-request"),
    Use("Basic", "s", "subscribe: SubscriptionTopic definitions on an R4 server (Subscriptions Backport IG)"),
    Use("SubscriptionTopic", "s", "subscribe: SubscriptionTopic definitions on an R4B server"),
)
# Each subscribed type (SPINEWATCH_SUBSCRIPTION_TYPES): read (a focus, a deleted resource's
# `{type}/{id}/_history`) and searched (the record, the reconciliation sweep).
SUBSCRIBED_LETTERS = "rs"
NOTE_BINARIES = Use("Binary", "r", "workers: note text held by reference (SPINEWATCH_NOTE_MAX_BINARY_READS > 0)")
TERMINOLOGY = Use("CodeSystem", "r", "terminology: $subsumes, when SPINEWATCH_TERMINOLOGY_URL is on the FHIR server")


def in_order(letters: Iterable[str]) -> str:
    found = set(letters)
    return "".join(letter for letter in LETTERS if letter in found)


def uses(subscribed_types: Iterable[str], *, reads_binaries: bool, terminology_on_fhir_server: bool) -> list[Use]:
    """Every interaction SpineWatch makes with its own credentials, for these settings."""
    found = list(ALWAYS) + [Use(t, SUBSCRIBED_LETTERS, "workers: the subscribed types") for t in subscribed_types]
    return found + ([NOTE_BINARIES] if reads_binaries else []) + ([TERMINOLOGY] if terminology_on_fhir_server else [])


def needs(found: Iterable[Use]) -> dict[str, str]:
    """Resource type -> the letters SpineWatch needs on it, types sorted."""
    merged: dict[str, set[str]] = {}
    for use in found:
        merged.setdefault(use.resource_type, set()).update(use.letters)
    return {t: in_order(merged[t]) for t in sorted(merged)}


def scope_for(resource_type: str, letters: str, version: ScopeVersion) -> str:
    """The scope(s) granting `letters` on a type. v2: one scope, its letters in order (SMART 2.x
    "Scope Equivalence": the shortest form). v1 has only `.read` and `.write`: `.write` comes first,
    because a server that applies the first scope it finds for a type (Medplum's server turns scopes
    into an access policy that way) would otherwise make the type read-only."""
    if version == "v2":
        return f"system/{resource_type}.{in_order(letters)}"
    words = (["write"] if set(letters) & set("cud") else []) + (["read"] if set(letters) & set("rs") else [])
    return " ".join(f"system/{resource_type}.{w}" for w in words)


def scope_string(needed: Mapping[str, str], version: ScopeVersion) -> str:
    """The `scope` of the token request for what SpineWatch needs."""
    return " ".join(scope_for(t, letters, version) for t, letters in needed.items())


_SYSTEM_SCOPE = re.compile(r"^system/(\*|[A-Za-z]+)\.(read|write|\*|c?r?u?d?s?)(?:\?.*)?$")


def granted(scope: str) -> dict[str, set[str]]:
    """Resource type (or `*`) -> the letters a scope string grants, v1 and v2 read alike. Only
    `system/` scopes count (a backend service has no user or patient); a scope with search-parameter
    constraints (`?category=...`) is taken as granting its letters."""
    found: dict[str, set[str]] = {}
    for word in scope.split():
        match = _SYSTEM_SCOPE.match(word)
        if match and match.group(2):
            found.setdefault(match.group(1), set()).update(_V1.get(match.group(2), match.group(2)))
    return found


def covers(grants: Mapping[str, set[str]], resource_type: str, letter: str) -> bool:
    return letter in grants.get(resource_type, set()) | grants.get("*", set())


def missing(needed: Mapping[str, str], scope: str, version: ScopeVersion) -> dict[str, str]:
    """Resource type -> the scope `scope` lacks for what SpineWatch needs on it, in `version` syntax."""
    grants = granted(scope)
    lacking = {t: "".join(letter for letter in letters if not covers(grants, t, letter))
               for t, letters in needed.items()}
    return {t: scope_for(t, letters, version) for t, letters in lacking.items() if letters}


def interaction_of(method: str, path: str) -> tuple[str, str] | None:
    """(resource type, letter) of a request to `path` (relative to the FHIR base, query allowed),
    per the SMART 2.x letters above; None for what names no type (metadata, a page link at the base)."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if not parts or not re.fullmatch(r"[A-Z][A-Za-z]+", parts[0]):
        return None
    rtype, rest, method = parts[0], parts[1:], method.upper()
    if method in ("GET", "HEAD"):
        # Type level: search and history are `s`; a type-level operation reads. Instance level: read,
        # vread, history and operations are `r`.
        return rtype, ("s" if not rest or rest[0] == "_history" else "r")
    if method == "POST":
        if not rest:
            return rtype, "c"
        return (rtype, "s") if rest == ["_search"] else None
    if method in ("PUT", "PATCH"):
        return rtype, "u"
    return (rtype, "d") if method == "DELETE" else None


@dataclass(frozen=True)
class Refusal:
    interaction: str | None  # "Communication create"; None when the request names no type
    needed_scope: str | None
    message: str


def refusal(method: str, path: str, status: int, what: str, version: ScopeVersion,
            requested: str | None) -> Refusal:
    """What to say when the FHIR server refused a request (403, or 401 insufficient_scope):
    the interaction and the scope it needs, never an id, a query value or the token. `requested`:
    the scope the token was asked for (None: not known, e.g. a static token), to tell a scope that
    was never asked for from one the server's policy for this client does not grant."""
    found = interaction_of(method, path)
    if found is None:
        return Refusal(None, None, f"{what} refused ({status}): not authorised")
    rtype, letter = found
    interaction, needed = f"{rtype} {VERBS[letter]}", scope_for(rtype, letter, version)
    if requested is not None and covers(granted(requested), rtype, letter):
        return Refusal(interaction, needed, f"{interaction} refused ({status}): {needed} was asked for, but the "
                                            "server's policy for this client does not grant it")
    return Refusal(interaction, needed, f"{interaction} refused ({status}): the token needs {needed}")
