"""The job queue: one SQLite file (standard library sqlite3) in the studio's data folder. A job is a train run:
its form values, its state (queued, running, stopped, failed, finished), its process id and that process' start
time (so a reused pid is not taken for it), its output folder, times and log. Every change is one transaction, so
several requests (or two studios on one data folder) never start a job twice."""

import json
import os
import sqlite3
import time
from pathlib import Path

ENDED = ("stopped", "failed", "finished")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'stopped', 'failed', 'finished')),
    options TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    output_name TEXT NOT NULL,
    resume_of INTEGER,
    pid INTEGER,
    pid_started TEXT,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    returncode INTEGER,
    error TEXT
)
"""


class JobError(ValueError):
    pass


class JobQueue:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    def connect(self) -> sqlite3.Connection:
        """A connection for one operation: autocommit, and BEGIN IMMEDIATE where a read decides a write."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return _Closing(db)

    def add(self, name: str, options: dict, output_dir: str, output_name: str, resume_of: int | None = None) -> int:
        with self.connect() as db:
            cursor = db.execute(
                "INSERT INTO jobs (name, state, options, output_dir, output_name, resume_of, created) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (name, json.dumps(options), output_dir, output_name, resume_of, time.time()))
            return cursor.lastrowid

    def get(self, job_id: int) -> dict:
        with self.connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobError(f"no job {job_id}")
        return as_dict(row)

    def all(self) -> list[dict]:
        with self.connect() as db:
            return [as_dict(row) for row in db.execute("SELECT * FROM jobs ORDER BY id DESC")]

    def in_state(self, *states) -> list[dict]:
        marks = ",".join("?" * len(states))
        with self.connect() as db:
            return [as_dict(r) for r in db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", states)]

    def claim_next(self, max_running: int) -> dict | None:
        """The oldest queued job, now running (pid not yet known), if fewer than `max_running` run."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                running = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0]
                row = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
                if running >= max_running or row is None:
                    db.execute("COMMIT")
                    return None
                db.execute("UPDATE jobs SET state = 'running', started = ?, pid = NULL, pid_started = NULL, "
                           "ended = NULL, returncode = NULL, error = NULL WHERE id = ?", (time.time(), row["id"]))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self.get(row["id"])

    def set_process(self, job_id: int, pid: int, pid_started: str | None):
        with self.connect() as db:
            db.execute("UPDATE jobs SET pid = ?, pid_started = ? WHERE id = ?", (pid, pid_started, job_id))

    def set_options(self, job_id: int, options: dict):
        with self.connect() as db:
            db.execute("UPDATE jobs SET options = ? WHERE id = ?", (json.dumps(options), job_id))

    def end(self, job_id: int, state: str, returncode: int | None = None, error: str | None = None):
        if state not in ENDED:
            raise JobError(f"a job ends stopped, failed or finished, not {state!r}")
        with self.connect() as db:
            db.execute("UPDATE jobs SET state = ?, ended = ?, returncode = ?, error = ? WHERE id = ?",
                       (state, time.time(), returncode, error, job_id))

    def request_stop(self, job_id: int) -> dict:
        """A queued job is stopped at once; a running one is marked (the runner sends SIGTERM)."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                raise JobError(f"no job {job_id}")
            if row["state"] == "queued":
                db.execute("UPDATE jobs SET state = 'stopped', ended = ? WHERE id = ?", (time.time(), job_id))
            elif row["state"] == "running":
                db.execute("UPDATE jobs SET stop_requested = 1 WHERE id = ?", (job_id,))
            db.execute("COMMIT")
        return self.get(job_id)

    def delete(self, job_id: int):
        job = self.get(job_id)
        if job["state"] == "running":
            raise JobError(f"job {job_id} is running: stop it first")
        with self.connect() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))


def as_dict(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["options"] = json.loads(job["options"])
    job["stop_requested"] = bool(job["stop_requested"])
    return job


class _Closing:
    """sqlite3's connection as a context manager that closes it (its own only ends a transaction)."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        return self.db

    def __exit__(self, *exc):
        self.db.close()


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (Linux /proc), to tell a job's process from a later one with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised command name


def process_alive(pid: int | None, started: str | None) -> bool:
    """Is the job's own process still running (not a zombie, not another process that got its pid)?"""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's: not ours
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return started is None  # no /proc (not Linux): the pid exists
    return state != "Z" and (started is None or process_start_time(pid) == started)
