"""`corejax bench`: corejax beside its peers on the same model in the same run, as one JSON record.

Suites (corejax/bench/<suite>.py): generation, embedding, ipc, tokenizer, concurrency, speculative, micro. A run produces
a record (corejax/bench/schema.py documents it), prints a table, can be saved as a named baseline and
compared with one (corejax/bench/record.py), and plotted (corejax/bench/plots.py).
"""

from corejax.bench.record import compare, load_record, metric, new_record, save_record
from corejax.bench.schema import SCHEMA, validate

__all__ = ["SCHEMA", "compare", "load_record", "metric", "new_record", "save_record", "validate"]
