"""`make faults-cluster` (not part of `make test`): the summary of the cluster fault scenarios."""

from __future__ import annotations

from typing import Any

from tests.cluster.test_cluster_faults import SUMMARY


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARY:
        return
    tr = terminalreporter
    tr.section("cluster faults: no accepted event lost")
    cols = list(SUMMARY[0])
    tr.write_line("  ".join(f"{c:>18}" for c in cols))
    for row in SUMMARY:
        tr.write_line("  ".join(f"{row[c]!s:>18}" for c in cols))
