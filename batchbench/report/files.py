"""Files of a command's result: JSON payload, CSV rows and a PNG figure, written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from batchbench.fmt import to_jsonable
from batchbench.store.results import atomic_write_text


def save_figure(fig: Any, path: str) -> None:
  """Renders a matplotlib ``Figure`` to ``path`` as PNG, atomically."""
  tmp = f"{path}.tmp.{os.getpid()}"
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore",
                          lineterminator="\n")
  writer.writeheader()
  writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
  atomic_write_text(path, text.getvalue())


def write_outputs(out_dir: str, stem: str, payload: dict[str, Any],
                  rows: Sequence[dict[str, Any]], columns: Sequence[str],
                  draw: Callable[[Any], None]) -> dict[str, str]:
  """Writes ``stem.json`` (payload), ``stem.csv`` (rows) and ``stem.png`` (``draw(fig)``).

  Returns:
    Kind (json, csv, png) -> path.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  paths = {kind: os.path.join(out_dir, f"{stem}.{kind}") for kind in ("json", "csv", "png")}
  write_csv(paths["csv"], rows, columns)
  fig = Figure(figsize=(7, 4.4), dpi=100, layout="constrained")
  draw(fig)
  save_figure(fig, paths["png"])
  atomic_write_text(paths["json"], json.dumps(to_jsonable({**payload, "files": paths}),
                                              indent=2, allow_nan=False))
  return paths
