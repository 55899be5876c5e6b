"""The live view of a pipeline run: a rich table of nodes (state, elapsed time, training step).

On a terminal it is a `rich.live.Live` table refreshed by the driver's scheduling loop; elsewhere (CI logs) it
prints one line per state change. Training steps come from each stage's `progress.json` (see tracking.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from pipeline.dag import NodeStatus

STYLE = {"hit": "cyan", "pending": "dim", "waiting": "magenta", "running": "yellow", "succeeded": "green",
         "failed": "bold red", "upstream_failed": "red", "not_run": "dim"}


def status_table(statuses: list[NodeStatus]) -> Table:
    table = Table(title="narvl pipeline", show_lines=False)
    for col in ("node", "state", "key", "elapsed", "step"):
        table.add_column(col)
    for st in statuses:
        step = f"{st.step}/{st.total or '?'}" if st.step is not None else ""
        elapsed = f"{st.elapsed:.0f}s" if st.elapsed is not None else ""
        table.add_row(Text(st.id), Text(st.state, STYLE.get(st.state, "white")), Text(st.key[:12]), elapsed, step)
    return table


class ProgressView:
    """Context manager; pass `.update` as run_pipeline's on_update."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._live: Live | None = None
        self._seen: dict[str, str] = {}

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            self._live = Live(status_table([]), console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, statuses: list[NodeStatus]) -> None:
        if self._live is not None:
            self._live.update(status_table(statuses))
            return
        for st in statuses:
            if self._seen.get(st.id) != st.state:
                self._seen[st.id] = st.state
                extra = f" ({st.elapsed:.1f}s)" if st.state in ("succeeded", "failed") and st.elapsed else ""
                # node ids hold ablation names in brackets (evaluate_narvl[ce]): literal text, not markup
                self.console.print(Text.assemble(f"{st.id}: ", (st.state, STYLE.get(st.state, "white")), extra))
