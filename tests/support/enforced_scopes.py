"""A FHIR server that enforces SMART scopes, for respx: the token endpoint turns the `scope` of each
client_credentials request into that token's access policy (as Medplum does: "the requested scopes
become an access policy"), and every FHIR request is checked against its token's policy; a request
the policy does not allow gets 403 with an OperationOutcome (code `forbidden`).

Two readings of a policy, `semantics=`:

- "spec": SMART App Launch 2.x, "Scopes for requesting FHIR resources": a request needs its own
  letter (c create, r read/vread/instance history/instance operation, u update, d delete, s search/
  type history) granted on its type or on `*`; v1 `.read` is `rs`, `.write` is `cud`, `.*` all five.
- "medplum": Medplum's server (packages/server/src/fhir/smart.ts): each type takes the first scope
  naming it (else the first naming `*`); that entry is read-only when its letters are only r and s
  (v1 `.read`), read-write otherwise; a type no scope names is not accessible.

Written independently of service/ (which maps requests to scopes itself): a test that passes here
passes because the two agree. Resources are kept in memory: read, search (a few parameters),
history, create, update; `metadata` and `.well-known/smart-configuration` need no token.
`refused` lists each refused request ("POST Communication"); `requests` every FHIR request.
"""

from __future__ import annotations

import itertools
import json
import re
from urllib.parse import parse_qs, urlsplit

import httpx

V1 = {"read": "rs", "write": "cud", "*": "cruds"}
SCOPE = re.compile(r"^system/(\*|[A-Za-z]+)\.(read|write|\*|[cruds]+)$")


def letters_needed(method: str, parts: list[str]) -> str:
    if method == "GET":
        return "s" if len(parts) == 1 or parts[1] == "_history" else "r"
    if method == "POST":
        return "s" if parts[1:] == ["_search"] else "c"
    return {"PUT": "u", "PATCH": "u", "DELETE": "d"}[method]


def allowed(scope: str, resource_type: str, letter: str, semantics: str) -> bool:
    grants = [(m.group(1), V1.get(m.group(2), m.group(2))) for m in map(SCOPE.match, scope.split()) if m]
    if semantics == "medplum":
        entry = next((g for g in grants if g[0] == resource_type), None) or \
            next((g for g in grants if g[0] == "*"), None)
        if entry is None:
            return False
        read_only = set(entry[1]) <= {"r", "s"}
        return letter in "rs" or not read_only
    return any(t in (resource_type, "*") and letter in granted for t, granted in grants)


def searchset(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def _reference(resource: dict) -> str | None:
    for field in ("subject", "patient"):
        value = resource.get(field)
        if isinstance(value, dict):
            return value.get("reference")
    return None


def _matches(resource: dict, params: dict[str, str]) -> bool:
    for name, value in params.items():
        if name == "patient" and _reference(resource) not in (value, f"Patient/{value}"):
            return False
        if name == "identifier":
            system, _, code = value.partition("|")
            if not any(i.get("system") == system and i.get("value") == code for i in resource.get("identifier") or []):
                return False
        if name == "url" and (resource.get("channel") or {}).get("endpoint") != value:
            return False
        if name in ("status", "code") and name in resource:
            field = resource[name]
            codes = {field} if isinstance(field, str) else {c.get("code") for c in (field or {}).get("coding", [])}
            if value not in codes:
                return False
    return True


class EnforcedScopeServer:
    def __init__(self, router, base: str, token_url: str, *, semantics: str = "spec", capability: dict | None = None):
        self.base, self.token_url, self.semantics = base.rstrip("/"), token_url, semantics
        self.capability = capability or {"resourceType": "CapabilityStatement", "status": "active",
                                         "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"]}
        self.resources: dict[tuple[str, str], dict] = {}
        self.tokens: dict[str, str] = {}  # access token -> the scope it was asked for
        self.requests: list[str] = []
        self.refused: list[str] = []
        self._ids = itertools.count(1)
        router.post(token_url).mock(side_effect=self._token)
        router.route(url__startswith=self.base + "/").mock(side_effect=self._fhir)

    def load(self, *resources: dict) -> None:
        for resource in resources:
            self.resources[(resource["resourceType"], resource["id"])] = dict(resource)

    def of_type(self, resource_type: str) -> list[dict]:
        return [r for (t, _), r in self.resources.items() if t == resource_type]

    @property
    def granted_scopes(self) -> list[str]:
        return list(self.tokens.values())

    def _token(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        if form.get("grant_type") != "client_credentials" or not form.get("client_assertion"):
            return httpx.Response(400, json={"error": "invalid_request"})
        token = f"token-{next(self._ids)}"
        self.tokens[token] = form.get("scope", "")
        return httpx.Response(200, json={"access_token": token, "token_type": "bearer", "expires_in": 3600,
                                         "scope": self.tokens[token]})

    def _fhir(self, request: httpx.Request) -> httpx.Response:
        url = urlsplit(str(request.url))
        path = url.path.removeprefix(urlsplit(self.base).path).strip("/")
        parts = [p for p in path.split("/") if p]
        method = request.method
        if parts in (["metadata"], [".well-known", "smart-configuration"]):
            body = self.capability if parts == ["metadata"] else {"token_endpoint": self.token_url,
                                                                  "capabilities": ["permission-v1", "permission-v2"]}
            return httpx.Response(200, json=body)
        self.requests.append(f"{method} {'/'.join(parts)}")
        scope = self.tokens.get(request.headers.get("authorization", "").removeprefix("Bearer "))
        if scope is None:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if not allowed(scope, parts[0], letters_needed(method, parts), self.semantics):
            self.refused.append(f"{method} {parts[0]}")
            return httpx.Response(403, json={"resourceType": "OperationOutcome",
                                             "issue": [{"severity": "error", "code": "forbidden"}]})
        return self._serve(method, parts, {k: v[0] for k, v in parse_qs(url.query).items()}, request)

    def _serve(self, method: str, parts: list[str], params: dict[str, str], request: httpx.Request) -> httpx.Response:
        rtype = parts[0]
        if method in ("POST", "PUT"):
            resource = json.loads(request.content)
            resource["id"] = parts[1] if method == "PUT" else f"{rtype.lower()}-{next(self._ids)}"
            resource["meta"] = (resource.get("meta") or {}) | {"versionId": str(next(self._ids))}
            self.load(resource)
            return httpx.Response(201 if method == "POST" else 200, json=resource)
        if len(parts) == 1:
            return httpx.Response(200, json=searchset([r for r in self.of_type(rtype) if _matches(r, params)]))
        found = self.resources.get((rtype, parts[1]))
        if found is None or (len(parts) > 2 and parts[2] != "_history"):
            return httpx.Response(404, json={"resourceType": "OperationOutcome",
                                             "issue": [{"severity": "error", "code": "not-found"}]})
        if len(parts) > 2:
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "history",
                                             "entry": [{"resource": found}]})
        return httpx.Response(200, json=found)
