"""Crash-safe JSONL result files: append whole lines, find what is done, repair, merge.

A result record counts as written once its newline is on disk. Writers append each line
with one unbuffered write, so a crash leaves at worst one partial last line (no newline);
:func:`scan_results` finds it and, when asked, truncates it away. Records are keyed by
:func:`id_key`, which keeps an id's JSON type: ``1`` and ``"1"`` are different ids.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not guarded against each other
    fcntl = None


class ResultFileError(ValueError):
    """A result or part file that is not ours to append to (or cannot be locked)."""


def id_key(row_id: str | int) -> str:
    """The canonical key of a row id: its JSON text, so that ``1`` and ``"1"`` differ."""
    return json.dumps(row_id, ensure_ascii=False)


@dataclass
class ScanResult:
    """What a result file holds: the keys of its complete records and its partial tail."""

    keys: set[str] = field(default_factory=set)
    lines: int = 0
    tail_bytes: int = 0  # bytes after the last newline (a partial line), 0 if none
    repaired: bool = False


def _complete_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line)`` for newline-terminated lines; the tail is not yielded."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.endswith(b"\n"):
                yield number, line


def _record_key(path: Path, number: int, line: bytes) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or "id" not in record:
        # A complete line that is not a record means this is not a file we wrote: appending
        # to it, or truncating it, could destroy someone's data.
        raise ResultFileError(
            f"{path}:{number}: not a result record of lmgen-fast; refusing to append to {path}"
        )
    return id_key(record["id"])


def scan_results(path: str | Path, *, repair: bool) -> ScanResult:
    """Read the ids already written to ``path`` (a missing file holds none).

    Parameters
    ----------
    path : str or Path
        A JSONL result file.
    repair : bool
        Truncate a partial last line (bytes after the last newline). Only the process that
        writes the file may repair it; readers ignore the tail.

    Returns
    -------
    ScanResult
        The keys of complete records, the number of lines, the size of the partial tail and
        whether it was truncated.

    Raises
    ------
    ResultFileError
        A complete line that is not a JSON object with an ``id``.
    """
    path = Path(path)
    result = ScanResult()
    if not path.exists():
        return result
    end = 0
    for number, line in _complete_lines(path):
        end += len(line)
        result.lines = number
        key = _record_key(path, number, line)
        if key is not None:
            result.keys.add(key)
    result.tail_bytes = path.stat().st_size - end
    if repair and result.tail_bytes:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        result.repaired = True
    return result


def iter_records(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """Yield ``(key, line)`` for each complete record of ``path``; a partial tail is skipped."""
    path = Path(path)
    for number, line in _complete_lines(path):
        key = _record_key(path, number, line)
        if key is not None:
            yield key, line


def encode_record(record: dict) -> bytes:
    """One JSONL line, UTF-8, newline-terminated."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


class ResultWriter:
    """Append records to a file, each line whole; ``sync`` makes them durable.

    The file is opened unbuffered, so each line reaches the OS in one ``write`` (retried
    until complete) and a killed process leaves at worst one partial line. An exclusive
    advisory lock (POSIX) refuses a second writer of the same file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab", buffering=0)
        if fcntl is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._file.close()
                raise ResultFileError(
                    f"another process is writing {self.path}; wait for it or stop it"
                ) from None

    def write_line(self, line: bytes) -> None:
        """Append one complete line (bytes ending in a newline)."""
        view = memoryview(line)
        while view:
            written = self._file.write(view)
            view = view[written:]

    def write(self, record: dict) -> None:
        """Append one record as a line."""
        self.write_line(encode_record(record))

    def sync(self) -> None:
        """Flush to the disk (fsync): what was written survives a power loss."""
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def part_path(output: str | Path, rank: int, world: int) -> Path:
    """The part file of ``rank`` of ``world``: ``results.jsonl.rank{r}-of-{n}``."""
    output = Path(output)
    return output.with_name(f"{output.name}.rank{rank}-of-{world}")


def part_files(output: str | Path) -> list[tuple[Path, int, int]]:
    """Existing part files of ``output``, as ``(path, rank, world)``, sorted."""
    output = Path(output)
    pattern = re.compile(re.escape(output.name) + r"\.rank(\d+)-of-(\d+)")
    found = []
    directory = output.parent if str(output.parent) else Path(".")
    if not directory.is_dir():
        return []
    for entry in directory.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file():
            found.append((entry, int(match.group(1)), int(match.group(2))))
    return sorted(found, key=lambda item: (item[2], item[1]))


def merge_parts(output: str | Path) -> tuple[int, int]:
    """Append the records of every part file of ``output`` to it, then delete the parts.

    Ids already in ``output`` (or earlier in the parts) are skipped, and a partial last line
    of ``output`` is repaired first, so merging again after a crash part-way is harmless.

    Returns
    -------
    (int, int)
        The number of part files merged and of records appended.
    """
    output = Path(output)
    parts = part_files(output)
    if not parts:
        return 0, 0
    with ResultWriter(output) as writer:
        seen = scan_results(output, repair=True).keys
        added = 0
        for path, _rank, _world in parts:
            for key, line in iter_records(path):
                if key not in seen:
                    seen.add(key)
                    writer.write_line(line)
                    added += 1
        writer.sync()
    # Parts go only once their records are durable in the output.
    for path, _rank, _world in parts:
        path.unlink(missing_ok=True)
    return len(parts), added


def write_atomic(path: str | Path, lines: list[bytes]) -> None:
    """Replace ``path`` with ``lines`` in one step (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def reorder(path: str | Path, keys: Sequence[str]) -> bool:
    """Rewrite ``path`` with its records in the order of ``keys``, atomically.

    Rows are appended as they finish, in batch order; a finished job's file is put in input
    order once, at the end. Records whose key is not in ``keys`` keep their relative order
    after the others, so nothing is lost. Only offsets are held in memory, not records.

    Parameters
    ----------
    path : str or Path
        A complete result file (no other writer).
    keys : sequence of str
        :func:`id_key` of each row, in the wanted order.

    Returns
    -------
    bool
        Whether the file was rewritten (``False``: already in order, or missing).
    """
    path = Path(path)
    if not path.exists():
        return False
    rank = {key: i for i, key in enumerate(keys)}
    spans: list[tuple[int, int, int]] = []  # (place, offset, length), in file order
    seen: set[str] = set()
    offset = 0
    for number, line in _complete_lines(path):
        key = _record_key(path, number, line)
        if key is not None:
            # A repeated or unknown key goes after the rows of ``keys``: kept, not dropped.
            place = rank[key] if key in rank and key not in seen else len(rank)
            seen.add(key)
            spans.append((place, offset, len(line)))
        offset += len(line)
    wanted = sorted(spans, key=lambda span: span[0])  # stable: extras keep their order
    if wanted == spans and offset == path.stat().st_size:
        return False
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for _place, start, size in wanted:
            src.seek(start)
            dst.write(src.read(size))
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    return True
