"""Token-entropy analysis of the forking-token paper: teacher-forced scoring, statistics, the forking-token
lexicon, overlap between models, and PNG/HTML reports."""

from forkflow.entropy.overlap import entropy_change_by_bucket, top_overlap
from forkflow.entropy.report import write_comparison, write_report
from forkflow.entropy.score import ScoredResponse, read_scored, score_responses
from forkflow.entropy.stats import entropy_summary, top_fraction

__all__ = [
    "ScoredResponse",
    "entropy_change_by_bucket",
    "entropy_summary",
    "read_scored",
    "score_responses",
    "top_fraction",
    "top_overlap",
    "write_comparison",
    "write_report",
]
