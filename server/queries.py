"""Metric queries: own or stitched points, by writer or averaged, optionally downsampled.

Blocks are read in one SQL statement (the lineage chain is a recursive CTE
joined to the blocks), then cut to each owner's step range, merged and
bucketed with numpy.

The statement has no ``ORDER BY``: the blocks (a few hundred rows, each a blob) are
put in arrival order (by id) in Python. SQLite cannot read them in id order from its
index, so ``ORDER BY b.id`` sorted the rows with their blobs in a temporary B-tree
that spilled to disk: two thirds of a 1e6-point query (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pluto.wire import SYSTEM_PREFIX, MetricQueryResult, MetricSeries
from pluto_server.errors import Unprocessable
from pluto_server.lineage import chain_cte
from pluto_server.schema import metric_keys, run_keys, runs

Aggregate = Literal["none", "mean"]
MAX_BUCKETS = 100_000
MAX_KEYS = 1000

#: The blocks of the chain (after ``chain_cte``) that overlap their owner's steps.
STITCHED_BLOCKS_OF_CHAIN = """
SELECT b.id, b.run_id, b.key_id, b.writer, b.step_min, b.step_max, b.steps, b.vals, b.times,
       c.fork_step, c.upper, c.depth
FROM metric_blocks b JOIN chain c ON b.run_id = c.id
WHERE b.key_id IN :key_ids
  AND (c.fork_step IS NULL OR b.step_max > c.fork_step)
  AND (c.upper IS NULL OR b.step_min <= c.upper)
  AND b.step_max >= :step_min AND b.step_min <= :step_max
"""

OWN_BLOCKS = """
SELECT b.id, b.run_id, b.key_id, b.writer, b.step_min, b.step_max, b.steps, b.vals, b.times,
       CAST(NULL AS BIGINT), CAST(NULL AS BIGINT), 0
FROM metric_blocks b
WHERE b.run_id = :run_id AND b.key_id IN :key_ids
  AND b.step_max >= :step_min AND b.step_min <= :step_max
"""

STEP_LIMIT = 2**63 - 1


@dataclass(frozen=True)
class MetricQuery:
    run_id: int
    keys: list[str] | None = None
    lineage: bool = False
    writer: int | None = None
    aggregate: Aggregate = "none"
    buckets: int | None = None
    step_min: int | None = None
    step_max: int | None = None

    def check(self) -> None:
        if self.buckets is not None and not 1 <= self.buckets <= MAX_BUCKETS:
            raise Unprocessable(f"buckets must be between 1 and {MAX_BUCKETS}")
        if self.aggregate not in ("none", "mean"):
            raise Unprocessable("aggregate must be 'none' (one series per writer) or 'mean'")
        if self.keys is not None and len(self.keys) > MAX_KEYS:
            raise Unprocessable(f"ask for at most {MAX_KEYS} keys at once")


def stitched_blocks(conn: Connection) -> str:
    """The lineage block query in this connection's dialect (the chain walk differs)."""
    return chain_cte(conn) + STITCHED_BLOCKS_OF_CHAIN


@dataclass
class _Parts:
    steps: list[npt.NDArray[np.int64]]
    values: list[npt.NDArray[np.float64]]
    times: list[npt.NDArray[np.float64]]
    owners: list[int]
    lengths: list[int]


def metric_keys_of(conn: Connection, run_id: int, lineage: bool) -> list[str]:
    if lineage:
        sql = chain_cte(conn) + (
            "SELECT DISTINCT k.key FROM run_keys rk JOIN chain c ON rk.run_id = c.id "
            "JOIN metric_keys k ON k.id = rk.key_id "
            f"WHERE c.depth = 0 OR k.key NOT LIKE '{SYSTEM_PREFIX}%' ORDER BY k.key"
        )
        return [str(k) for (k,) in conn.execute(sa.text(sql), {"run_id": run_id})]
    rows = conn.execute(
        sa.select(metric_keys.c.key)
        .join(run_keys, run_keys.c.key_id == metric_keys.c.id)
        .where(run_keys.c.run_id == run_id)
        .order_by(metric_keys.c.key)
    )
    return [str(k) for (k,) in rows]


def run_metrics(conn: Connection, query: MetricQuery) -> MetricQueryResult:
    query.check()
    project_id = conn.execute(
        sa.select(runs.c.project_id).where(runs.c.id == query.run_id)
    ).scalar_one()
    names = query.keys if query.keys is not None else metric_keys_of(
        conn, query.run_id, query.lineage
    )
    key_rows = conn.execute(
        sa.select(metric_keys.c.id, metric_keys.c.key).where(
            metric_keys.c.project_id == project_id, metric_keys.c.key.in_(names)
        )
    ).all() if names else []
    key_names = {int(i): str(k) for i, k in key_rows}
    if not key_names:
        return MetricQueryResult(run=query.run_id, lineage=query.lineage, series=[])
    sql = stitched_blocks(conn) if query.lineage else OWN_BLOCKS
    params: dict[str, int | list[int]] = {
        "run_id": query.run_id,
        "key_ids": list(key_names),
        "step_min": query.step_min if query.step_min is not None else -STEP_LIMIT - 1,
        "step_max": query.step_max if query.step_max is not None else STEP_LIMIT,
    }
    if query.writer is not None:
        sql += " AND b.writer = :writer"
        params["writer"] = query.writer
    statement = sa.text(sql).bindparams(sa.bindparam("key_ids", expanding=True))
    # Arrival order (block id), so ties in (step, time) keep it on every backend.
    blocks = sorted(fetch_blocks(conn, statement, params), key=itemgetter(0))
    groups: dict[tuple[int, int], _Parts] = {}
    for (_, run_id, key_id, writer, block_min, block_max, raw_steps, raw_vals, raw_times,
         lower, upper, depth) in blocks:
        if depth and key_names[int(key_id)].startswith(SYSTEM_PREFIX):
            continue  # system metrics describe the machines of one run: never inherited
        steps = np.frombuffer(raw_steps, dtype="<i8")
        values = np.frombuffer(raw_vals, dtype="<f8")
        times = np.frombuffer(raw_times, dtype="<f8")
        # The steps this block may contribute: its owner's range within the query's window.
        low = query.step_min
        if lower is not None and (low is None or lower >= low):
            low = int(lower) + 1  # lower is exclusive
        high = query.step_max
        if upper is not None and (high is None or upper < high):
            high = int(upper)
        if (low is not None and block_min < low) or (high is not None and block_max > high):
            mask: npt.NDArray[np.bool_] = np.ones(len(steps), dtype=bool)
            if low is not None:
                mask &= steps >= low
            if high is not None:
                mask &= steps <= high
            steps, values, times = steps[mask], values[mask], times[mask]
        if not len(steps):
            continue
        group_writer = -1 if query.aggregate == "mean" else int(writer)
        parts = groups.setdefault((int(key_id), group_writer), _Parts([], [], [], [], []))
        parts.steps.append(steps)
        parts.values.append(values)
        parts.times.append(times)
        parts.owners.append(int(run_id))
        parts.lengths.append(len(steps))
    series = []
    for (key_id, writer), parts in sorted(groups.items(), key=lambda g: (key_names[g[0][0]],
                                                                          g[0][1])):
        steps = np.concatenate(parts.steps)
        values = np.concatenate(parts.values)
        times = np.concatenate(parts.times)
        owners: npt.NDArray[np.int64] = np.repeat(np.array(parts.owners, dtype=np.int64),
                                                  parts.lengths)
        if not _strictly_increasing(steps):
            # Stable by step, then by wall time, so repeated logs of a step keep their order.
            order = np.lexsort((times, steps))
            steps, values, times, owners = (steps[order], values[order], times[order],
                                            owners[order])
        if query.aggregate == "mean":
            steps, values, times, owners = _mean_per_step(steps, values, times, owners)
        label = None if writer < 0 else writer
        if query.buckets is None:
            series.append(MetricSeries(
                key=key_names[key_id], writer=label, steps=steps.tolist(),
                owners=owners.tolist(), values=values.tolist(), times=times.tolist(),
            ))
        else:
            series.append(_downsample(key_names[key_id], label, steps, values, times,
                                      owners, query.buckets))
    return MetricQueryResult(run=query.run_id, lineage=query.lineage, series=series)


def fetch_blocks(conn: Connection, statement: sa.TextClause, params: dict[str, int | list[int]]
           ) -> list[Any]:
    """Every row of a block query, its blobs as bytes.

    On PostgreSQL the rows come in binary format: psycopg asks for text by default, and
    bytea as text is hex, twice the bytes plus their decoding (fetching 1e6 points took
    112 ms as text, 50 ms as binary). SQLAlchemy has no switch for it, so the statement,
    compiled by SQLAlchemy, runs on a binary cursor of the same connection and transaction.
    """
    if conn.dialect.name != "postgresql":
        return list(conn.execute(statement, params))
    bound = statement.bindparams(*(
        sa.bindparam(name, value, type_=sa.BigInteger, expanding=isinstance(value, list))
        for name, value in params.items()
    ))
    compiled = bound.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    driver: Any = conn.connection.driver_connection
    with driver.cursor(binary=True) as cursor:
        cursor.execute(compiled.string, compiled.params)
        return list(cursor.fetchall())


def _strictly_increasing(steps: npt.NDArray[np.int64]) -> bool:
    """True when sorting by (step, time) would leave the order as it is (one O(n) pass):
    the common case of a chain whose runs each logged their steps in order."""
    return bool(np.all(steps[1:] > steps[:-1]))


def _mean_per_step(
    steps: npt.NDArray[np.int64],
    values: npt.NDArray[np.float64],
    times: npt.NDArray[np.float64],
    owners: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64],
           npt.NDArray[np.int64]]:
    """One point per step: the mean over writers (NaN ignored), latest time, its owner."""
    starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
    means = _nanmean_reduceat(values, starts)
    last_times = np.maximum.reduceat(times, starts)
    return steps[starts], means, last_times, owners[starts]


def _nanmean_reduceat(
    values: npt.NDArray[np.float64], starts: npt.NDArray[np.intp]
) -> npt.NDArray[np.float64]:
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, then the general case below
        sums = np.add.reduceat(values, starts)
    if not np.isnan(sums).any():  # no NaN in any bucket: every value counts
        means: npt.NDArray[np.float64] = sums / np.diff(starts, append=len(values))
        return means
    valid = ~np.isnan(values)
    sums = np.add.reduceat(np.where(valid, values, 0.0), starts)
    counts = np.add.reduceat(valid.astype(np.int64), starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means


def _downsample(
    key: str,
    writer: int | None,
    steps: npt.NDArray[np.int64],
    values: npt.NDArray[np.float64],
    times: npt.NDArray[np.float64],
    owners: npt.NDArray[np.int64],
    buckets: int,
) -> MetricSeries:
    """Equal-width step buckets with min/max/mean; a bucket never straddles a fork.

    Step ``s`` falls in bucket ``(s - first) * buckets // width``. The steps are sorted, so
    where each bucket starts is a binary search for its first step, not an index computed
    for every point (at 1e7 points, three arrays of 80 MB less to fault in).
    """
    first, last = int(steps[0]), int(steps[-1])
    width = last - first + 1
    if width * buckets < 2**62:
        # Bucket k starts at the first step >= first + ceil(k * width / buckets); an edge
        # past the last step starts no bucket (and first + width could overflow).
        gaps: npt.NDArray[np.int64] = -((np.arange(1, buckets, dtype=np.int64) * -width)
                                        // buckets)
        edges = first + gaps[gaps < width]
        bucket_starts: npt.NDArray[np.intp] = np.searchsorted(steps, edges, side="left")
    else:  # steps near 2**63: the exact product would overflow int64
        index = np.minimum(((steps - first) / width * buckets).astype(np.int64), buckets - 1)
        bucket_starts = np.flatnonzero(index[1:] != index[:-1]) + 1
    owner_starts: npt.NDArray[np.intp] = np.flatnonzero(owners[1:] != owners[:-1]) + 1
    starts = np.union1d(np.union1d(bucket_starts, owner_starts), [0])
    ends = np.r_[starts[1:], len(steps)]
    return MetricSeries(
        key=key,
        writer=writer,
        steps=steps[starts].tolist(),
        last_steps=steps[ends - 1].tolist(),
        owners=owners[starts].tolist(),
        mins=np.fmin.reduceat(values, starts).tolist(),
        maxs=np.fmax.reduceat(values, starts).tolist(),
        means=_nanmean_reduceat(values, starts).tolist(),
        counts=(ends - starts).tolist(),
        times=times[starts].tolist(),
    )


LAST_BLOCKS = """
SELECT b.run_id, b.key_id, b.steps, b.vals, m.top
FROM metric_blocks b
JOIN (SELECT run_id, key_id, MAX(step_max) AS top FROM metric_blocks
      WHERE run_id IN :run_ids AND key_id IN :key_ids GROUP BY run_id, key_id) m
  ON m.run_id = b.run_id AND m.key_id = b.key_id AND b.step_max = m.top
"""


def last_values(conn: Connection, project_id: int, run_ids: list[int], names: list[str]
                ) -> dict[int, dict[str, float]]:
    """Per run, each named key's value at the run's highest own step of it (mean across
    the writers that logged that step)."""
    if not run_ids or not names:
        return {}
    if len(names) > MAX_KEYS:
        raise Unprocessable(f"ask for at most {MAX_KEYS} metrics at once")
    key_names = {int(i): str(k) for i, k in conn.execute(
        sa.select(metric_keys.c.id, metric_keys.c.key).where(
            metric_keys.c.project_id == project_id, metric_keys.c.key.in_(names)))}
    if not key_names:
        return {}
    statement = sa.text(LAST_BLOCKS).bindparams(sa.bindparam("run_ids", expanding=True),
                                                sa.bindparam("key_ids", expanding=True))
    found: dict[tuple[int, int], list[npt.NDArray[np.float64]]] = {}
    for run_id, key_id, raw_steps, raw_vals, top in conn.execute(
            statement, {"run_ids": run_ids, "key_ids": list(key_names)}):
        steps = np.frombuffer(raw_steps, dtype="<i8")
        values = np.frombuffer(raw_vals, dtype="<f8")
        found.setdefault((int(run_id), int(key_id)), []).append(values[steps == int(top)])
    result: dict[int, dict[str, float]] = {}
    for (run_id, key_id), parts in found.items():
        values = np.concatenate(parts)
        valid = values[~np.isnan(values)]
        result.setdefault(run_id, {})[key_names[key_id]] = (
            float(valid.mean()) if len(valid) else float("nan"))
    return result
