"""Suites by name: :data:`SUITES` and :func:`get_suite` (``"lab"``, ``"real"`` or a Suite instance).

Kept apart from :mod:`.suites` (which defines :class:`~.suites.Suite`) and :mod:`.real_suite` (which
subclasses it) so both can be imported from here without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable

from frontier_trainer.evaluation.real_suite import RealSuite
from frontier_trainer.evaluation.suites import LabSuite, Suite

SuiteFactory = Callable[[], Suite]

SUITES: dict[str, SuiteFactory] = {"lab": LabSuite, "real": RealSuite}
"""Registered suites by name: ``get_suite(name)`` builds one with its defaults."""


def get_suite(suite: str | Suite) -> Suite:
    """A :class:`~.suites.Suite` instance from a name in :data:`SUITES` (or the instance itself)."""
    if isinstance(suite, Suite):
        return suite
    if not isinstance(suite, str) or suite not in SUITES:
        raise ValueError(
            f"suite={suite!r} is not a known suite; use one of {sorted(SUITES)} or a Suite instance."
        )
    return SUITES[suite]()
