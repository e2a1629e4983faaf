"""All SpineWatch settings: environment variables with the prefix SPINEWATCH_ (pydantic-settings).

Development defaults work out of the box; `environment=production` refuses placeholder secrets and
development-only switches. Every setting is documented in the README with its default.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRET = "dev-only-change-me"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPINEWATCH_", extra="ignore")

    environment: str = Field("development", pattern="^(development|test|production)$")
    # Clinical
    lookback_days: int = Field(90, ge=1, le=3650)

    @model_validator(mode="after")
    def _refuse_placeholders_in_production(self) -> "Settings":
        if self.environment != "production":
            return self
        problems = [name for name, value in self.model_dump().items()
                    if isinstance(value, str) and value == PLACEHOLDER_SECRET]
        if problems:
            raise ValueError(f"production refuses placeholder secrets in: {', '.join('SPINEWATCH_' + p.upper() for p in problems)}")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
