"""`make faults-cluster` (not part of `make test`): the summary of the cluster fault scenarios."""

from __future__ import annotations

from typing import Any

from tests.support.faults import CLUSTER_SUMMARY


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not CLUSTER_SUMMARY:
        return
    tr = terminalreporter
    tr.section("cluster faults: no accepted event lost")
    cols = list(CLUSTER_SUMMARY[0])
    tr.write_line("  ".join(f"{c:>18}" for c in cols))
    for row in CLUSTER_SUMMARY:
        tr.write_line("  ".join(f"{row[c]!s:>18}" for c in cols))
