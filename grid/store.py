"""Content-addressed artifact store under a root URI (``pyarrow.fs``: a local folder by default,
``s3://``, ``gs://``, ``hdfs://`` on a cluster).

Layout: ``<root>/<stage kind>/<key[:2]>/<key>.bdg``. Each file is a small header (magic +
sha256 of the payload) followed by the payload, so the checksum travels with the artifact
in one file and one atomic move: a write goes to a temporary name beside the target and is
then renamed over it, so a crash never leaves a half file under the final name. A read
checks the checksum; a truncated or altered file raises ``CorruptArtifact`` and the runner
recomputes that stage instead of trusting it.

Objects (checkpoints, indices, metrics) are stored with ``torch.save`` to bytes and read with
``torch.load(weights_only=True)``: tensors, dicts, lists, strings and numbers only, never
arbitrary pickles.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

MAGIC = b"BDGRID1\n"
HEADER = len(MAGIC) + 32  # magic + sha256 digest


class CorruptArtifact(Exception):
    """An artifact whose bytes do not match its checksum (truncated, partial or altered)."""


class ArtifactStore:
    def __init__(self, root: str | Path):
        root = str(root)
        if "://" in root:
            self.fs, self.base = pafs.FileSystem.from_uri(root)
            self.local = isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.fs, self.base = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
            self.local = True
        self.uri = root
        # remote stores: {kind: (when listed, keys present)}; see ``exists``
        self._listed: dict[str, tuple[float, set]] = {}
        self._listing = threading.Lock()

    # ------------------------------------------------------------------ paths

    def path(self, kind: str, key: str) -> str:
        return f"{self.base}/{kind}/{key[:2]}/{key}.bdg"

    def resource_dir(self) -> Path:
        """A local folder for ``defense.resources.ResourceCache``: inside the store when the store
        is local, else a per-machine cache (each node then computes a resource at most once)."""
        if self.local:
            return Path(self.base) / "resources"
        return Path(os.environ.get("BDGRID_CACHE", "~/.cache/bdgrid")).expanduser() / "resources"

    # ------------------------------------------------------------------ bytes

    def put_bytes(self, kind: str, key: str, payload: bytes) -> str:
        final = self.path(kind, key)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{key}.{uuid.uuid4().hex}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(MAGIC + hashlib.sha256(payload).digest())
                f.write(payload)
            self.fs.move(tmp, final)  # atomic rename on local and HDFS; a single PUT on object stores
        except OSError as e:
            # a full disk must not keep the partial file: each retry would leave another one and
            # make the disk fuller (issue 17)
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            from results.writer import WriteError

            raise WriteError.of(Path(final) if self.local else final, e) from None
        self._note(kind, key, True)
        return final

    def get_bytes(self, kind: str, key: str) -> bytes:
        """The payload; FileNotFoundError when absent, CorruptArtifact when its checksum fails."""
        p = self.path(kind, key)
        try:
            with self.fs.open_input_stream(p) as f:
                blob = f.read()
        except (FileNotFoundError, OSError) as e:
            if self.fs.get_file_info(p).type != pafs.FileType.File:  # asked now, not from a listing
                raise FileNotFoundError(p) from e
            raise
        if len(blob) < HEADER or blob[: len(MAGIC)] != MAGIC:
            raise CorruptArtifact(f"{p}: not a bdgrid artifact or truncated header ({len(blob)} bytes)")
        payload = blob[HEADER:]
        if hashlib.sha256(payload).digest() != blob[len(MAGIC):HEADER]:
            raise CorruptArtifact(f"{p}: checksum mismatch ({len(blob)} bytes; truncated or altered)")
        return payload

    LISTING_TTL = 60.0  # seconds a remote listing answers "absent" before it is listed again

    def exists(self, kind: str, key: str) -> bool:
        """Whether the artifact is there. Local: one stat. Remote (s3://, gs://): a resume or dry
        run asks this for every stage, and one HEAD request each, one at a time, made a dry run of
        10k stages 5x slower than local (issue 18); instead each kind's folder is listed once
        (one recursive listing, 1000 keys per request on S3) and the answers come from that set.
        A key absent from a listing older than ``LISTING_TTL`` is listed again (another driver may
        have written it since); what this process writes or deletes updates the set."""
        if self.local:
            return self.fs.get_file_info(self.path(kind, key)).type == pafs.FileType.File
        return key in self._present(kind, fresh_for=self.LISTING_TTL)

    def _present(self, kind: str, fresh_for: float) -> set:
        with self._listing:
            got = self._listed.get(kind)
            if got is None or time.monotonic() - got[0] > fresh_for:
                sel = pafs.FileSelector(f"{self.base}/{kind}", recursive=True, allow_not_found=True)
                keys = {i.base_name[:-4] for i in self.fs.get_file_info(sel)
                        if i.type == pafs.FileType.File and i.base_name.endswith(".bdg")}
                got = self._listed[kind] = (time.monotonic(), keys)
            return got[1]

    def _note(self, kind: str, key: str, present: bool) -> None:
        got = self._listed.get(kind)
        if got is not None:
            (got[1].add if present else got[1].discard)(key)

    def verify(self, kind: str, key: str) -> bool:
        """True when the artifact is present, intact and loadable with ``weights_only=True`` (a
        file with a valid checksum that the safe loader refuses, e.g. one written by another
        version or with a pickled object, is as unusable as a truncated one: it is recomputed)."""
        try:
            self._load(self.get_bytes(kind, key), self.path(kind, key))
            return True
        except (FileNotFoundError, CorruptArtifact):
            return False

    def delete(self, kind: str, key: str) -> None:
        self._note(kind, key, False)
        try:
            self.fs.delete_file(self.path(kind, key))
        except (FileNotFoundError, OSError):
            pass

    # ------------------------------------------------------------------ objects

    def put(self, kind: str, key: str, obj: Any) -> str:
        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        return self.put_bytes(kind, key, buf.getvalue())

    def get(self, kind: str, key: str) -> Any:
        return self._load(self.get_bytes(kind, key), self.path(kind, key))

    @staticmethod
    def _load(payload: bytes, where: str) -> Any:
        import pickle

        import torch

        try:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
            # torch's own message suggests weights_only=False: never for a file we did not just write
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise CorruptArtifact(f"{where}: the safe loader (weights_only=True) refuses it ({first}); "
                                  f"it will be recomputed") from None
