"""Opening a parquet table another step wrote, with the errors a user can act on.

Every reader of a DAG table goes through `open_table`, so a missing file, a file that is not
parquet and a file without the columns a step needs are refused alike, naming the file and
the step to run. It imports pyarrow alone: the training side uses it too.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from longctx.errors import LongctxError, one_line


def open_table(path: str | Path, columns: list[str],
               made_by: str = "the step that writes it") -> pq.ParquetFile:
    """The parquet file at `path`, checked to hold `columns`; `made_by` is what to run when it
    is missing (`the pack step`)."""
    path = Path(path)
    if not path.is_file():
        raise LongctxError(f"{path}: file not found (run {made_by})")
    try:
        table = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise LongctxError(f"{path}: not a readable parquet file ({one_line(exc)})") from None
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        raise LongctxError(f"{path}: missing column(s) {', '.join(missing)}")
    return table
