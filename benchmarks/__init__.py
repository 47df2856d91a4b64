"""Benchmarks and the chaos soak: real consumers, PostgreSQL, Redis and the fake provider server.

They print figures and write JSON under benchmarks/results/; they are not tests and CI does not
run them. See benchmarks/README.md and docs/benchmarks.md.
"""
