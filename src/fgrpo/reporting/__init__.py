"""Results: the run directory writer (metrics.jsonl, summary.json) and the comparison report."""
