"""Fakes the benchmarks run and the tests share: the fake Resend + Postmark server.

Tests import from here; nothing here imports from tests/.
"""
