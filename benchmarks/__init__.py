"""Benchmarks of what the worker adds between the platform and vLLM: `python -m benchmarks`
(see __main__.py for the scenarios and options, README "Performance" for the figures)."""
