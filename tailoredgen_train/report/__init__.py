"""What a run leaves for people: OUTPUT/metrics.jsonl (one line per step), the summary in
result.json, and OUTPUT/report.html (status, curves, samples, hyperparameters on one page)."""

from .html import build_report, refresh_report
from .metrics import MetricsLog, read_metrics, read_progress
from .result import peak_memory, published_checkpoints, summarize, summarize_run

__all__ = ["MetricsLog", "build_report", "peak_memory", "published_checkpoints", "read_metrics", "read_progress",
           "refresh_report", "summarize", "summarize_run"]
