"""Small helpers that turn results into Dagster UI metadata."""


import base64
import io
import resource
from collections.abc import Callable

import dagster as dg


def markdown_table(rows: list[dict]) -> str:
    """A markdown table of dict rows (columns from the first row)."""
    if not rows:
        return "_(none)_"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def progress_logger(context: dg.AssetExecutionContext, every: int) -> Callable[[int, int], None]:
    """A progress callback that logs ``done/total`` every ``every`` items and at the end."""

    def progress(done: int, total: int) -> None:
        if done == total or done // every != (done - 1) // every:
            context.log.info(f"{done}/{total} ({100 * done / max(total, 1):.0f}%)")

    return progress


def figure_markdown(figure, alt: str = "plot") -> dg.MetadataValue:
    """A matplotlib figure shown inline in the Dagster UI (markdown with a PNG data URI)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})")


def peak_rss_metadata() -> dict[str, int]:
    """Peak resident memory so far, in MB, of the step's process and of its largest finished child
    (worker pools count once they are shut down). With one process per step (Dagster's default
    executor) that is the asset's own peak; run in process, the run's peak up to this asset."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mb": round(own / 1024), "peak_rss_children_mb": round(children / 1024)}
