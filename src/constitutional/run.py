"""The run directory (docs/ARCHITECTURE.md "Run directory", a contract).

    runs/<name>/manifest.json   resolved config, package versions, git commit, seed, per-stage status
    runs/<name>/<stage>/...     each stage writes only under its own folder

Small files are written atomically (temp file, fsync, rename), so a crash never leaves a half-written
manifest. Generation stages append one JSON object per line to a `RecordShard`, flushed and fsynced
per record; on reopen a torn last line (a `kill -9` mid-write) is cut off, and finished ids are
skipped, so a rerun resumes without duplicating or losing a record. A finished stage is skipped
unless its config hash changed or `force` is given; a stale stage folder is moved aside, not deleted.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_input_text(path: str | Path) -> str:
    """The text of an input file, gunzipped when its name ends in `.gz` (`.jsonl.gz`, `.json.gz`, ...).
    A file that is not UTF-8 or a broken gzip file is a one-line `UserError`."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a complete gzip file ({e}); download it again (`gunzip -t` checks a file)") from None


def read_records(path: str | Path, fix: str = "fix or remove it") -> list[tuple[object, int]]:
    """Strict JSON Lines for input files (`.jsonl`, or gzipped `.jsonl.gz`): [(value, line number)],
    blank lines skipped. A file that is not UTF-8 or a malformed line is a one-line `UserError`
    naming the line and ending with `fix` (what to do). Callers check the shape of each value."""
    path = Path(path)
    text = read_input_text(path)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), i))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: malformed JSON line ({e.msg}); {fix}") from None
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file written by `RecordShard`, ignoring a torn final line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn last write: the record will be redone
                break
            raise UserError(f"{path}:{i + 1}: corrupt record line; delete the line or rerun with --force") from None
    return records


class RecordShard:
    """Append-only JSONL keyed by record `id`: resumable and duplicate-free.

    `done` holds the ids already on disk; `append` writes one record, flushes and fsyncs it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self.records = read_jsonl(self.path)
        self.done = {r["id"] for r in self.records}
        self._f = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> None:
        # Cut a torn last line so the next append starts on a fresh line.
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def append(self, record: dict) -> None:
        if "id" not in record:
            raise ValueError("record without an id")
        if record["id"] in self.done:
            return
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.add(record["id"])
        self.records.append(record)

    def todo(self, items: Iterable[dict]) -> list[dict]:
        return [it for it in items if it["id"] not in self.done]

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def package_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("constitutional", "torch", "transformers", "trl", "datasets", "accelerate", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


class RunDir:
    """A run directory: manifest, per-stage folders, stage status and a process lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"  # per process: several training ranks start at once
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"run directory {self.path}: cannot write there ({e.strerror}); choose another --run-dir") from None
        self.manifest_path = self.path / "manifest.json"
        self.manifest = self._load_manifest()
        self._lock_file = None

    def reload(self) -> None:
        """Read the manifest again (another process, e.g. a stage's own, has written it)."""
        self.manifest = self._load_manifest()

    def _load_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"name": self.path.name, "created": now(), "stages": {}}
        try:
            m = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{self.manifest_path}:{e.lineno}: malformed manifest; restore it or use a new --run-dir") from None
        m.setdefault("stages", {})
        return m

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunDir"]:
        """Hold an exclusive lock so that two processes never write one run directory."""
        f = open(self.path / ".lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserError(f"run directory {self.path} is in use by another cai process; wait for it or use another --run-dir") from None
        try:
            yield self
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    def save(self) -> None:
        self.manifest["updated"] = now()
        atomic_write_json(self.manifest_path, self.manifest)

    def stage_dir(self, stage: str) -> Path:
        d = self.path / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def stage_status(self, stage: str) -> dict:
        return self.manifest["stages"].get(stage, {})

    def is_done(self, stage: str, config_hash: str) -> bool:
        """Whether `stage` finished with the config whose hash is `config_hash`."""
        st = self.stage_status(stage)
        return st.get("status") == "done" and st.get("config_hash") == config_hash

    def begin(self, stage: str, config: dict, config_hash: str, seed: int | None, force: bool = False) -> bool:
        """Mark `stage` as running. Returns False when it is already done with this config (skip).

        A stage folder left by a different config (or `force`) is renamed `<stage>.stale-<time>`
        so that nothing is lost and no stale record is trusted.
        """
        st = self.stage_status(stage)
        if self.is_done(stage, config_hash) and not force:
            return False
        d = self.path / stage
        if d.exists() and (force or (st and st.get("config_hash") != config_hash)):
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            target, k = self.path / f"{stage}.stale-{stamp}", 1
            while target.exists():
                k += 1
                target = self.path / f"{stage}.stale-{stamp}-{k}"
            os.replace(d, target)
        self.manifest.setdefault("versions", package_versions())
        self.manifest.setdefault("git_commit", git_commit())
        if seed is not None:
            self.manifest["seed"] = seed
        self.manifest.setdefault("config", {})[stage] = config
        self.manifest["stages"][stage] = {
            "status": "running",
            "config_hash": config_hash,
            "started": now(),
            "argv": sys.argv[1:],
            "pid": os.getpid(),  # the process that runs it (a pipeline runs each stage in its own)
            "_t0": time.time(),
        }
        self.save()
        self.stage_dir(stage)
        return True

    def finish(self, stage: str, summary: dict | None = None) -> None:
        st = self.manifest["stages"][stage]
        st["status"] = "done"
        st["finished"] = now()
        st["seconds"] = round(time.time() - st.pop("_t0", time.time()), 2)
        if summary is not None:
            st["summary"] = summary
        self.save()

    def fail(self, stage: str, error: str) -> None:
        st = self.manifest["stages"].get(stage, {})
        st["status"] = "failed"
        st["error"] = error
        st["seconds"] = round(time.time() - st.pop("_t0", time.time()), 2)
        self.manifest["stages"][stage] = st
        self.save()
