"""Measuring the service: llama-bench-style benchmarks, the conditions they ran under, the
bandwidth roofline, and the verification that judges a start against its target."""
