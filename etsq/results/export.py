"""Exporting a run, to stdout or a file: `jsonl`, one JSON object per problem with its whole tree, or
`reference`, the reference implementation's JSON list of answers (see `etsq.results.reference`).

A file is written beside its target and renamed into place, so a failed export never leaves a
half-written file, and the run is checked to exist before anything is created.  A target that exists
and is not a regular file (`/dev/stdout`, a named pipe) is written in place: renaming over it would
replace a device node with a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from etsq.errors import UserError
from etsq.procs import atomic_write_text

if TYPE_CHECKING:
    from etsq.store.session import Store

FORMATS = ("jsonl", "reference")


def export_lines(store: Store, run_id: int, fmt: str = "jsonl") -> Iterator[str]:
    """The export of a run, line by line (UserError for an unknown run, raised before the first line)."""
    # Imported here: the CLI reads FORMATS at start-up, and the database layer costs ~0.5 s to import.
    from etsq.store.runs import statuses

    with store.session() as s:
        statuses(s, [run_id])
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return _lines(store, run_id, fmt)


def _lines(store: Store, run_id: int, fmt: str) -> Iterator[str]:
    from etsq.results.reference import reference_chunks
    from etsq.results.reference_runs import reference_entries
    from etsq.store.runs import export_jobs

    with store.session() as s:
        if fmt == "reference":
            yield from reference_chunks(reference_entries(s, run_id))
        else:
            yield from (json.dumps(obj, ensure_ascii=False) + "\n" for obj in export_jobs(s, run_id))


def write_atomically(path: Path, lines: Iterable[str]) -> None:
    """Write `lines` to `path` through a temporary sibling (`etsq.procs.atomic_file`); on any error
    the sibling is removed.

    Raises UserError naming the path when it cannot be written (no such directory, no permission,
    a full device).
    """
    if str(path) in ("", "."):
        raise UserError("the output file name is empty")
    try:
        atomic_write_text(path, lines)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
