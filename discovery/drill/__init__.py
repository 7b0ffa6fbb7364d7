"""Region-failure drills: drive load in every region of a running cluster, inject a fault,
hold it, heal it, and report what kept working and what converged (docs/drills.md).

Public API: ``run_drill``, ``DrillSettings``, ``DrillError``, ``Progress``, ``Report``,
``SCENARIOS``, ``ClusterFile``, ``ClusterFileError``, ``LoadSettings``, ``Bounds``,
``LinkSettings``.
"""

from discovery.drill.analysis import Bounds
from discovery.drill.cluster import ClusterFile, ClusterFileError
from discovery.drill.load import LoadSettings
from discovery.drill.report import Report
from discovery.drill.runner import DrillError, DrillSettings, Progress, run_drill
from discovery.drill.scenarios import SCENARIOS, LinkSettings

__all__ = [
    "SCENARIOS",
    "Bounds",
    "ClusterFile",
    "ClusterFileError",
    "DrillError",
    "DrillSettings",
    "LinkSettings",
    "LoadSettings",
    "Progress",
    "Report",
    "run_drill",
]
