"""Choosing the model: the fit-first planner, the auto fallback after a failed verification, and
the plan as a report."""
