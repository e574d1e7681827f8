"""Phase 3, using the model: the generation engine, teacher-forced scoring and the metrics
(evaluate, scripts/ask.py, export's parity check)."""
