"""bdgrid results: a versioned Parquet dataset, paper tables and plots. No torch, ray or defense.

* ``write_stage(out_dir, stage, key, rows, table="results")``: one atomic Parquet file per
  finished stage (``results.writer``; schema in ``results.schema``).
* ``load(out_dir, table="results")``: every row as a pandas DataFrame, older schema versions
  upgraded, re-written stages deduplicated (latest wins) (``results.reader``). Each file's
  sha256 and the row invariants are checked (``results.integrity``); a damaged file is named
  once on stderr and left out, so ``done_keys(out_dir)`` does not count its stage as done.
* Disk faults (``results.writer``): ``WriteError`` names a file a full or read-only disk
  refused; ``atomic_write``, ``clean_stale_tmp``, ``set_aside_damaged`` for the grid.
* ``markdown(df)`` / ``paper_table(df)``: the attack x defense table a grid prints at its end
  (``results.tables``); ``results.plots`` draws the figures.
"""
from results.schema import SCHEMA_VERSION  # noqa: F401
from results.writer import write_stage  # noqa: F401
from results.reader import done_keys, load  # noqa: F401
from results.writer import WriteError  # noqa: F401


def markdown(df, metrics=("acc", "asr", "der"), rows="attack", cols="defense", **kw) -> str:
    """Markdown attack x defense table of ``df`` (see ``results.tables.render``)."""
    from results.tables import markdown as _md

    return _md(df, metrics=metrics, rows=rows, cols=cols, **kw)


paper_table = markdown
