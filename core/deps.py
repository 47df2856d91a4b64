"""What the state transitions of a delivery work with: one bundle, passed as one argument.

`core.bootstrap.App` is one as it is, so entry points pass their `app`. A Protocol rather
than App itself: core's transitions need only these four, never the engine or the chain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from core.config import Settings
    from core.crypto import Keyring
    from core.db import SessionFactory
    from core.dispatch import Enqueuer


class Deps(Protocol):
    """The settings, the database, the broker seam and the keyring (read on first use)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def session_factory(self) -> SessionFactory: ...

    @property
    def enqueuer(self) -> Enqueuer: ...

    @property
    def keyring(self) -> Keyring: ...
