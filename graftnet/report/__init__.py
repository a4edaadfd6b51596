"""Run report: PNG plots and a single self-contained HTML page."""
