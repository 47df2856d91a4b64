"""Periodic safety nets (dispatcher, backstop, failed retrier)."""
