"""``--out s3://bucket/prefix``: a run folder kept in an object store through a local mirror.

Every reader and writer of a run folder (results, curves, state, logs, failures, warnings) works
on a local folder; this module makes an ``s3://`` (or any ``pyarrow.fs`` URI other than a local
path) ``--out`` into one without knowing the folder's layout:

- the mirror is ``$BDGRID_CACHE/out/<hash of the URI>/`` (default ``~/.cache/bdgrid``);
- ``pull()`` makes it equal to the remote prefix (one recursive listing; new or changed objects
  are downloaded, objects deleted remotely are deleted here), at the start of every command that
  reads or resumes the run;
- ``push()`` makes the remote prefix equal to it (one walk of the folder; new or changed files
  are uploaded, files deleted here are deleted there), after each finished stage and state write
  (at most every ``PUSH_EVERY`` seconds) and at the end of the run. A driver killed between two
  pushes loses at most the last seconds of results: the next run recomputes those eval stages
  (their artifacts are in the artifact store already).

The ``artifacts/`` folder is not mirrored (it is the artifact store, which workers reach
directly). Names starting with '.' are never mirrored: they are this project's temporaries (``.*.tmp``),
the driver's lock (``.driver.lock``) and the mirror's own record (``.mirror.json``). The lock is
therefore per machine: two drivers on one ``s3://`` out from two machines are not stopped.

The endpoint and credentials are pyarrow's (``pyarrow.fs.S3FileSystem.from_uri``): the URI's
query (``?endpoint_override=HOST:PORT&scheme=http&region=...``) or the standard AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``AWS_DEFAULT_REGION``). Sources: https://arrow.apache.org/docs/python/generated/pyarrow.fs.S3FileSystem.html
and https://docs.aws.amazon.com/sdkref/latest/guide/feature-ss-endpoints.html.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

MANIFEST = ".mirror.json"
# the artifact store's default place under an s3:// out (``bdgrid run`` puts it there): read and
# written by the workers directly, never copied into the mirror
NOT_MIRRORED = ("artifacts",)
PUSH_EVERY = 2.0  # seconds between two pushes while a run goes on; the last one is forced at the end
THREADS = 16  # concurrent transfers: object stores answer each request in tens of ms

_MIRRORS: dict[Path, "RemoteOut"] = {}  # mirror folder -> its remote, for the runner's pushes


class RemoteOutError(RuntimeError):
    """The remote --out cannot be read or written (bad URI, no bucket, no credentials, network)."""


def is_remote(out) -> bool:
    """True for a URI that is not a local path (``s3://``, ``gs://``, ...; ``file://`` is local)."""
    s = str(out)
    return "://" in s and not s.startswith("file://")


def shown(uri: str) -> str:
    """The URI as it may be printed: no user:password part, no secret-looking query values."""
    uri = re.sub(r"://[^/@]*@", "://", uri)
    return re.sub(r"((?:access_key|secret_key|session_token)=)[^&]*", r"\1***", uri)


def _first(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def mirror_dir(uri: str) -> Path:
    """The local mirror of ``uri``: ``$BDGRID_CACHE/out/<sha256 of the URI>`` (default ~/.cache/bdgrid)."""
    root = Path(os.environ.get("BDGRID_CACHE") or "~/.cache/bdgrid").expanduser() / "out"
    return root / hashlib.sha256(uri.encode()).hexdigest()[:16]


class RemoteOut:
    """One remote run folder and its local mirror."""

    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.fs, base = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError, TypeError) as e:
            raise RemoteOutError(f"--out {shown(uri)}: not a usable URI ({_first(e)}); e.g. "
                                 f"s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http, with the "
                                 f"credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
        self.base = base.rstrip("/")
        if "/" not in self.base and isinstance(self.fs, pafs.S3FileSystem):
            raise RemoteOutError(f"--out {shown(uri)}: give a prefix inside the bucket (s3://bucket/prefix): "
                                 f"the run folder must not be a whole bucket")
        self.local = mirror_dir(uri)
        self.last_push = 0.0
        self._man: dict | None = None

    def child_uri(self, name: str) -> str:
        """The URI of ``name`` under this prefix, with the same query (endpoint, scheme, region)."""
        path, q, query = self.uri.partition("?")
        return f"{path.rstrip('/')}/{name}" + (q + query if q else "")

    # ------------------------------------------------------------------ the record of what was synced

    def _manifest(self) -> dict:
        if self._man is None:
            p = self.local / MANIFEST
            try:
                self._man = json.loads(p.read_text()) if p.exists() else {}
            except ValueError:
                self._man = {}  # a damaged record: the next pull compares everything anew
        return self._man

    def _save(self) -> None:
        p = self.local / MANIFEST
        tmp = p.with_name(f".mirror.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(self._manifest()))
        os.replace(tmp, p)

    # ------------------------------------------------------------------ listing

    def _remote_files(self) -> dict[str, tuple[int, int | None]]:
        """{relative path: (size, mtime)}: the top level, then each folder but the artifact store
        (whose objects may be many and large) recursively."""
        try:
            top = self.fs.get_file_info(pafs.FileSelector(self.base, recursive=False, allow_not_found=True))
            infos = [i for i in top if i.type == pafs.FileType.File]
            for d in top:
                if d.type == pafs.FileType.Directory and d.base_name not in NOT_MIRRORED:
                    infos += self.fs.get_file_info(pafs.FileSelector(d.path, recursive=True, allow_not_found=True))
        except OSError as e:
            raise RemoteOutError(f"cannot list {shown(self.uri)}: {_first(e)}") from None
        out = {}
        for i in infos:
            if i.type != pafs.FileType.File:
                continue
            rel = i.path[len(self.base) + 1:]
            if rel and not any(part.startswith(".") for part in rel.split("/")):
                out[rel] = (i.size, i.mtime_ns)
        return out

    def _local_files(self) -> dict[str, os.stat_result]:
        out = {}
        for root, dirs, files in os.walk(self.local):
            dirs[:] = [d for d in dirs if not d.startswith(".")
                       and not (d in NOT_MIRRORED and os.path.samefile(root, self.local))]
            for f in files:
                if not f.startswith("."):
                    p = os.path.join(root, f)
                    try:
                        out[os.path.relpath(p, self.local).replace(os.sep, "/")] = os.stat(p)
                    except FileNotFoundError:
                        pass  # removed while we walked (a set-aside, a compaction): the next push sees it
        return out

    # ------------------------------------------------------------------ the two directions

    def pull(self) -> Path:
        """Bring the remote's changes into the mirror; returns the mirror folder.

        A file changed here since the last sync (a driver killed before its push) is kept, and
        pushed by the next run, unless the remote changed it too (another machine). While a
        driver of this machine holds the mirror (``bdgrid status`` beside ``bdgrid run``), the
        mirror is the newest copy and nothing is pulled."""
        self.local.mkdir(parents=True, exist_ok=True)
        _MIRRORS[self.local.resolve()] = self
        remote = self._remote_files()
        self.found = len(remote)
        if _driver_holds(self.local):
            return self.local
        man = self._manifest()
        local = self._local_files()
        get = []
        for rel, (size, mtime) in remote.items():
            m, st = man.get(rel), local.get(rel)
            same_remote = m is not None and m["size"] == size and m.get("mtime") in (None, mtime)
            if same_remote:
                m["mtime"] = mtime  # a file we pushed: its remote time is known from this listing on
            if st is None or not same_remote:
                get.append(rel)
        self._transfer(get, self._download)
        for rel in get:
            size, mtime = remote[rel]
            st = os.stat(self.local / rel)
            man[rel] = {"size": size, "mtime": mtime, "lsize": st.st_size, "lmtime": st.st_mtime_ns}
        for rel in [r for r in man if r not in remote]:  # deleted remotely (set aside, compacted)
            st = local.get(rel)
            if st is not None and (st.st_size, st.st_mtime_ns) == (man[rel]["lsize"], man[rel]["lmtime"]):
                (self.local / rel).unlink(missing_ok=True)
            del man[rel]
        self._save()
        return self.local

    def push(self) -> int:
        """Make the remote prefix equal to the mirror; returns the number of objects changed."""
        man = self._manifest()
        local = self._local_files()
        put = [rel for rel, st in local.items()
               if rel not in man or (st.st_size, st.st_mtime_ns) != (man[rel]["lsize"], man[rel]["lmtime"])]
        gone = [rel for rel in man if rel not in local]
        self._transfer(put, self._upload)
        for rel in put:
            st = local[rel]
            man[rel] = {"size": st.st_size, "mtime": None, "lsize": st.st_size, "lmtime": st.st_mtime_ns}
        self._transfer(gone, self._delete)
        for rel in gone:
            del man[rel]
        if put or gone:
            self._save()
        self.last_push = time.monotonic()
        return len(put) + len(gone)

    def maybe_push(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last_push >= PUSH_EVERY:
            self.push()

    def prove_writable(self) -> None:
        """Write and delete one object under the prefix: wrong credentials or a read-only bucket
        are one message before any compute, not a failure after the first stage."""
        probe = f"{self.base}/.write-probe-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(probe) as f:
                f.write(b"bdgrid")
            self.fs.delete_file(probe)
        except OSError as e:
            raise RemoteOutError(f"cannot write to {shown(self.uri)}: {_first(e)}") from None

    # ------------------------------------------------------------------ one file

    def _transfer(self, rels: list[str], one) -> None:
        if not rels:
            return
        try:
            with ThreadPoolExecutor(min(THREADS, len(rels))) as ex:
                list(ex.map(one, rels))
        except OSError as e:
            raise RemoteOutError(f"{shown(self.uri)}: {_first(e)}") from None

    def _download(self, rel: str) -> None:
        dest = self.local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_input_stream(f"{self.base}/{rel}") as src, open(tmp, "wb") as f:
            while chunk := src.read(1 << 22):
                f.write(chunk)
        os.replace(tmp, dest)  # readers of the mirror never see half a file

    def _upload(self, rel: str) -> None:
        try:
            data = (self.local / rel).read_bytes()
        except FileNotFoundError:
            return  # removed since the walk: the next push deletes it remotely
        with self.fs.open_output_stream(f"{self.base}/{rel}") as f:
            f.write(data)  # one PUT: the object appears whole or not at all

    def _delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(f"{self.base}/{rel}")
        except FileNotFoundError:
            pass


def _driver_holds(folder: Path) -> bool:
    """Whether a live driver of this machine holds ``folder``'s lock (``grid.lock``)."""
    import fcntl

    from grid.lock import LOCK_FILE

    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def open_out(out: str, pull: bool = True, existing: bool = False) -> RemoteOut:
    """The RemoteOut of ``out`` with its mirror pulled (the start of every command on it);
    ``existing``: a command that reads a run refuses a prefix with nothing under it."""
    r = RemoteOut(out)
    if pull:
        r.pull()
        if existing and not r.found:
            raise RemoteOutError(f"no run at {shown(out)}: nothing under that prefix (check the bucket, the prefix "
                                 f"and the endpoint)")
    return r


def mirror_of(path) -> RemoteOut | None:
    """The remote whose mirror ``path`` is (pulled in this process), else None: a local run folder."""
    try:
        return _MIRRORS.get(Path(path).resolve())
    except OSError:
        return None


def local_folder(out) -> Path:
    """``out`` as a local folder: itself, or the pulled mirror of a remote URI (RemoteOutError
    when it cannot be read)."""
    return open_out(str(out), existing=True).local if is_remote(out) else Path(out)
