"""Transitional: the stored-assessment reader now lives in service/infra/assessments.py. Kept only
while callers outside the workers' files still import it from here; import from
service.infra.assessments instead."""

from service.infra.assessments import StoredAssessments, assessment_from_json, default_source, fresh_assessment

__all__ = ["StoredAssessments", "assessment_from_json", "default_source", "fresh_assessment"]
