"""bdgrid results: a versioned Parquet dataset, paper tables and plots. No torch, ray or defense.

* ``write_stage(out_dir, stage, key, rows, table="results")``: one atomic Parquet file per
  finished stage (``results.writer``; schema in ``results.schema``).
* ``load(out_dir, table="results")``: every row as a pandas DataFrame, older schema versions
  upgraded, re-written stages deduplicated (latest wins) (``results.reader``).
* ``markdown(df)`` / ``paper_table(df)``: the attack x defense table a grid prints at its end
  (``results.tables``); ``results.plots`` draws the figures.
"""
from results.schema import SCHEMA_VERSION  # noqa: F401
from results.writer import write_stage  # noqa: F401
from results.reader import load  # noqa: F401


def markdown(df, metrics=("acc", "asr", "der"), rows="attack", cols="defense", **kw) -> str:
    """Markdown attack x defense table of ``df`` (see ``results.tables.render``)."""
    from results.tables import markdown as _md

    return _md(df, metrics=metrics, rows=rows, cols=cols, **kw)


paper_table = markdown
