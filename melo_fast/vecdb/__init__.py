"""MELO's inner vector database: clusters of keys as tensors, searched by one op, grown by one insert.

- ``database.py``: :class:`VectorDatabase` (the tensors, search, statistics, state dict);
- ``insert.py``: one batch's insert as the named steps of a :class:`~melo_fast.vecdb.insert.Placement`
  (MELO's rules and the re-edit rule, DESIGN §1 and §2.10, with MELO's conflict split or the voronoi rule);
- ``scan.py``: the insert's exact scan of the centers;
- ``rows.py``: :class:`~melo_fast.vecdb.rows.RowBuffer`, room to append rows to published tensors;
- ``wordings.py``: an edit given in several wordings: which rows, and the radius of their keys;
- ``naive.py``: the same rules as plain loops over clusters, the oracle the fast code is tested against.
"""

from melo_fast.vecdb.database import CONFLICT_RULES, VectorDatabase
from melo_fast.vecdb.insert import COINCIDE_FRACTION, SPLIT_MARGIN, InsertCounts, coinciding_conflicts

__all__ = [
    "COINCIDE_FRACTION", "CONFLICT_RULES", "SPLIT_MARGIN", "InsertCounts", "VectorDatabase", "coinciding_conflicts",
]
