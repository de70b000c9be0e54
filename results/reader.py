"""Read the results dataset back as a pandas DataFrame, deduplicated by stage key."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds


def load(out_dir: str | Path, table: str = "results") -> pd.DataFrame:
    d = Path(out_dir) / table
    files = sorted(str(p) for p in d.glob("*.parquet")) if d.exists() else []
    if not files:
        return pd.DataFrame()
    df = ds.dataset(files, format="parquet").to_table().to_pandas()
    if "written_at" in df.columns:
        df = df.sort_values("written_at")
    return df.drop_duplicates(subset=["key"] + (["split"] if "split" in df.columns else []), keep="last").reset_index(drop=True)
