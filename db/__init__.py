"""dittune's database: SQLAlchemy 2.0 ORM (tables prefixed dittune_), SQLite by default, any SQL URL."""

from . import leases
from .models import SCHEMA_VERSION, Claim, Gpu, Lease, Study, Trial, Workload
from .queries import BEST_RULE, LEGACY_PEAK_ALLOWANCE, Result, StudySummary, UnknownStudy, best, frontier, measured, pareto, pick, studies, study, study_pick, trials
from .session import Database, DatabaseError, default_url, exclusive, open_db
from .store import MEASURED, GpuKey, StudyKey, TrialRecord, WorkloadKey, find_measured, open_study, record_trial

__all__ = [
    "leases", "SCHEMA_VERSION", "Claim", "Lease", "exclusive", "Gpu", "Study", "Trial", "Workload", "BEST_RULE", "LEGACY_PEAK_ALLOWANCE", "Result",
    "StudySummary", "UnknownStudy", "best", "frontier", "measured", "pareto", "pick", "studies", "study", "study_pick", "trials",
    "Database", "DatabaseError", "default_url", "open_db", "MEASURED", "GpuKey",
    "StudyKey", "TrialRecord", "WorkloadKey", "find_measured", "open_study", "record_trial",
]
