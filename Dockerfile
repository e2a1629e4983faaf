# SpineWatch: one image for the API, the Celery worker and Celery beat (docker-compose.yml picks the
# command). Settings come from SPINEWATCH_ environment variables; see docs/deploy.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fhir_mappings ./fhir_mappings
COPY service ./service
COPY workers ./workers
# postgres extra: the psycopg driver for a PostgreSQL audit log
RUN pip install ".[postgres]" \
 && useradd --system --uid 10001 --home-dir /app spinewatch

USER spinewatch
ENV SPINEWATCH_ENVIRONMENT=production
EXPOSE 8000
# `spinewatch serve` runs uvicorn with the settings' HTTP limits (h11, SPINEWATCH_HTTP_MAX_HEADER_BYTES,
# SPINEWATCH_HTTP_KEEP_ALIVE_SECONDS) and refuses invalid settings with exit 2. Proxy headers are on:
# behind a TLS-terminating proxy, trust its X-Forwarded-* (set FORWARDED_ALLOW_IPS). That proxy must
# time out slow headers (uvicorn cannot; docs/operations.md). No access log: RequestIdMiddleware
# writes one JSON line per request, without query strings.
CMD ["spinewatch", "serve", "--host", "0.0.0.0", "--port", "8000"]
