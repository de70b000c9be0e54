"""bdgrid results: one Parquet file per finished stage, read back as pandas DataFrames.

``results.load(out_dir)`` returns every result row (deduplicated by stage key, latest wins).
"""
from results.writer import SCHEMA_VERSION, write_stage  # noqa: F401
from results.reader import load  # noqa: F401
