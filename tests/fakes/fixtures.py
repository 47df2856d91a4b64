"""Fixtures for the fake provider and SMTP servers."""
