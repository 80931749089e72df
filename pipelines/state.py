"""Run state: which earlier results a run may reuse instead of redoing the work.

Two sources, one mechanism:

- the last committed run under the output prefix (`OUT/_latest` -> `OUT/<run>/variants`):
  a nightly run carries each unchanged (sku, recipe, variant) forward, pointing at the
  image object that run wrote, with `reused_from` naming the run that generated it;
- the journal of earlier attempts of the same run id (`OUT/<run>/_journal/aNNNN/*.parquet`,
  written by every Finish batch as it completes): rerunning an interrupted run finishes only
  the work the interrupted attempts did not.

A variant is reused only when its state key matches: a hash of the input (source bytes,
overlay mask bytes, title, category, attributes: everything an op or prompt can read), the
recipe hash (every op's validated config and version) and the identity of every model the
recipe names. Anything else is regenerated.

A distributed pass reads both sources once and writes them back, through storage, as shards
by sku hash whose rows are sorted by sku and cut into small pages
(`OUT/<run>/_prior/aNNNN-<id>/shard-NNNNN.pages`, pipelines/prior_index.py); a worker reads
the one page a sku needs, for a whole batch at once, and keeps the last few indexed. Neither
the driver nor the object store holds the prior rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipelines import prior_index
from pipelines.hashes import hash64
from pipelines.schema import VARIANT_SCHEMA, conform
from pipelines.storage import StorageConfig, StorageError, arrow_filesystem, delete_objects, exists, join, list_objects, read_bytes, write_bytes

log = logging.getLogger(__name__)

LATEST = "_latest"
RUN_RECORD = "_run.json"
JOURNAL = "_journal"
PRIOR = "_prior"  # this run's shards of reusable rows (deleted on commit, like the journal)
SHARD_ROWS = 50_000  # rows per state shard: what one gather task sorts (~100 MB)
SCATTER_ROWS = 65_536  # rows one scatter task reads; tasks x shards fragments are written


def input_sha256(source_sha256: str, overlay_sha256: str, title: str | None, category: str | None, attributes: str | None) -> str:
    """Everything about a manifest row that an op can see. Pixels are identified by the
    hash of their encoded bytes, so deciding to reuse never needs a decode."""
    parts = [source_sha256, overlay_sha256, title or "", category or "", attributes or "{}"]
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def recipe_fingerprint(recipe_hash: str, model_identities: list[str]) -> str:
    return hashlib.sha256(json.dumps([recipe_hash, model_identities]).encode()).hexdigest()


def state_key(input_sha: str, recipe_fp: str) -> str:
    return hashlib.sha256(f"{input_sha}\x00{recipe_fp}".encode()).hexdigest()


def shard_of(sku: str, n: int) -> int:
    return hash64(sku) % n


def with_shards(table: pa.Table, n: int) -> pa.Table:
    """`table` with an int32 `shard` column: each row's shard of `n` by its sku."""
    return table.append_column("shard", pa.array([shard_of(s or "", n) for s in table["sku"].to_pylist()], pa.int32()))


def attempt_dir(run_prefix: str, attempt: int) -> str:
    return join(run_prefix, JOURNAL, f"a{attempt:04d}")


# ---------------------------------------------------------------------------- on the driver


@dataclasses.dataclass(frozen=True)
class PriorState:
    """Where an attempt's reusable variant rows are: shard files by sku hash under `prefix`
    (`present`: the shard numbers that have rows). Small and picklable: tasks carry it."""

    prefix: str = ""
    shards: int = 0
    present: frozenset[int] = frozenset()
    storage: StorageConfig | None = None
    committed_run: str | None = None  # the run `_latest` named, if any
    rows: int = 0

    def __bool__(self) -> bool:
        return bool(self.present)


def latest_run(output: str, storage: StorageConfig) -> str | None:
    uri = join(output, LATEST)
    if not exists(uri, storage):
        return None
    try:
        return json.loads(read_bytes(uri, storage))["run_id"]
    except (ValueError, KeyError, TypeError):
        log.warning("%s is not a skustudio pointer; ignoring it (this run regenerates everything)", uri)
        return None


def journal_attempts(run_prefix: str, storage: StorageConfig) -> dict[int, list[str]]:
    """{attempt number: journal file URIs} of earlier attempts of a run."""
    out: dict[int, list[str]] = {}
    root = join(run_prefix, JOURNAL)
    for uri in list_objects(root, storage):
        rel = uri[len(root) + 1 :]
        head, _, name = rel.partition("/")
        if head.startswith("a") and head[1:].isdigit() and name.endswith(".parquet") and not name.startswith("."):
            out.setdefault(int(head[1:]), []).append(uri)
    return out


def journal_file_name(key_hash: str, rows: int) -> str:
    """A journal file's name: the hash of its rows' keys (a retried task overwrites its own
    file) and its row count, so the passes after execution can group files into blocks of a
    known size without opening them."""
    return f"{key_hash}.r{rows}.parquet"


# A journal file named before the count was in its name (a run resumed across an upgrade):
# one CPU batch of a few SKUs.
UNCOUNTED_JOURNAL_ROWS = 16


def journal_file_rows(uri: str) -> int:
    stem = uri.rsplit("/", 1)[-1].removesuffix(".parquet")
    _, dot, count = stem.rpartition(".r")
    return int(count) if dot and count.isdigit() else UNCOUNTED_JOURNAL_ROWS


def journal_groups(files: list[str], rows_per_block: int) -> list[list[str]]:
    """Consecutive journal files grouped to about `rows_per_block` rows a group (whole files:
    a group holds at least one)."""
    groups: list[list[str]] = []
    rows = rows_per_block
    for uri in files:
        if rows >= rows_per_block:
            groups.append([])
            rows = 0
        groups[-1].append(uri)
        rows += journal_file_rows(uri)
    return groups


@dataclasses.dataclass(frozen=True)
class Journal:
    """One attempt's journal, to be read back in blocks of about `rows_per_block` rows."""

    run_prefix: str
    attempt: int
    storage: StorageConfig
    rows_per_block: int

    def groups(self) -> list[list[str]]:
        """The journal files in the groups that become blocks (listed now: call once per pass
        that must see the same blocks)."""
        return journal_groups(sorted(journal_attempts(self.run_prefix, self.storage).get(self.attempt, [])), self.rows_per_block)

    def rows(self):
        return journal_rows(self.run_prefix, self.attempt, self.storage, self.rows_per_block)


def journal_blocks(groups: list[list[str]]):
    """A Dataset of one row per group of journal files (`uris`), one group a block: the source
    that every pass over the journal maps whole blocks of.

    Plain tasks read the files, not read_parquet: its footer-reader actors are spread over
    every node, GPU nodes the autoscaler is about to remove included, and a read then fails
    with its actor (seen in tests/cluster/test_autoscaling.py under load)."""
    import ray

    return ray.data.from_items([{"uris": g} for g in groups], override_num_blocks=len(groups))


def journal_rows(run_prefix: str, attempt: int, storage: StorageConfig, rows_per_block: int):
    """This attempt's output rows as a lazy Dataset read back from its journal, so that no
    pass after execution holds the catalog's rows in the driver.

    One block per group of ~`rows_per_block` rows (the commit's part size): every pass maps
    whole blocks, so Ray Data fuses read -> flag -> write into one task and the commit's rows
    go from a worker's heap to a part file without waiting in the object store for a bundle
    to fill (that bundle was the object store's peak: 20 MB at 10k SKUs; bench/catalog_phases.py)."""
    import ray

    from pipelines.schema import OUTPUT_SCHEMA

    groups = Journal(run_prefix, attempt, storage, rows_per_block).groups()
    if not groups:
        return ray.data.from_arrow(OUTPUT_SCHEMA.empty_table())
    return journal_blocks(groups).map_batches(_read_journal, fn_kwargs={"storage": storage}, batch_format="pyarrow", batch_size=None)


def read_journal_group(uris: list[str], storage: StorageConfig, schema: pa.Schema | None = None) -> pa.Table:
    """One group's rows, conformed to today's output schema (or to `schema`, a part of it:
    only those columns are read)."""
    from pipelines.schema import OUTPUT_SCHEMA

    return _read_conformed(uris, storage, schema or OUTPUT_SCHEMA)


def _read_journal(batch: pa.Table, storage: StorageConfig) -> pa.Table:
    return read_journal_group([u for group in batch["uris"].to_pylist() for u in group], storage)


def _read_variants(uris: list[str], storage: StorageConfig) -> pa.Table:
    """Variant rows from Parquet files, conformed to today's schema (columns an older
    run lacks become nulls, so its rows simply never match)."""
    return _read_conformed(uris, storage, VARIANT_SCHEMA, kind="variant")


def _read_conformed(uris: list[str], storage: StorageConfig, schema: pa.Schema, kind: str | None = None) -> pa.Table:
    """Rows of Parquet files (of one filesystem) cast to `schema`; columns a file lacks
    become nulls. With `kind`, only rows of that kind (files without the column: all)."""
    if not uris:
        return schema.empty_table()
    fs, _ = arrow_filesystem(uris[0], storage)
    paths = [arrow_filesystem(u, storage)[1] for u in uris]
    try:
        dataset = pads.dataset(paths, filesystem=fs, format="parquet")
        # Only the columns that survive `conform` (and the filter) are read and decoded.
        present = set(dataset.schema.names)
        table = dataset.to_table(columns=[n for n in dict.fromkeys([*schema.names, *(["kind"] if kind else [])]) if n in present])
    except (OSError, pa.ArrowInvalid) as exc:
        raise StorageError(f"cannot read earlier results under {uris[0].rsplit('/', 2)[0]}: {exc}") from None
    if kind and "kind" in table.column_names:
        table = table.filter(pc.equal(table["kind"], kind))
    return conform(table, schema)


def load_prior(output: str, run_id: str, storage: StorageConfig, *, attempt: int, full: bool) -> PriorState:
    """Reusable rows for this attempt: the journal of earlier attempts (always) and the last
    committed run (unless `full`), resharded by sku on the workers through storage
    (pipelines/prior_index.py). Journal rows win over committed ones for the same key (see
    prior_rows)."""
    import ray

    run_prefix = join(output, run_id)
    journal = [u for a, files in sorted(journal_attempts(run_prefix, storage).items()) if a < attempt for u in files]
    committed = None if full else latest_run(output, storage)
    committed_files = []
    if committed and committed != run_id:
        committed_files = [u for u in list_objects(join(output, committed, "variants"), storage) if u.endswith(".parquet")]
    files = [{"uri": u, "origin": "committed"} for u in committed_files] + [{"uri": u, "origin": "journal"} for u in journal]
    if not files:
        return PriorState(committed_run=committed)
    # 1. Rows per file from the Parquet footers (a small read each, on the workers), for the
    #    number of shards and the files per scatter task.
    sources = ray.data.from_items(files, override_num_blocks=min(len(files), 64))
    per_file: dict[str, int] = {}
    for b in sources.map_batches(_count_rows, fn_kwargs={"storage": storage}, batch_format="pyarrow").iter_batches(batch_size=None, batch_format="pyarrow"):
        per_file.update(zip(b["uri"].to_pylist(), b["rows"].to_pylist()))  # blocks come back in any order
    counts = [per_file[f["uri"]] for f in files]
    rows = sum(counts)
    if not rows:
        return PriorState(committed_run=committed)
    n = max(1, math.ceil(rows / SHARD_ROWS))
    stale = list_objects(join(run_prefix, PRIOR), storage)
    if stale:  # an interrupted attempt's shards
        delete_objects(stale, storage)
    # Unique per load: workers cache pages by URI, and outlive runs on a long-lived cluster.
    prefix = join(run_prefix, PRIOR, f"a{attempt:04d}-{uuid.uuid4().hex[:12]}")
    # 2. Scatter: each task reads ~SCATTER_ROWS rows, conforms them to today's schema and
    #    writes one fragment per shard. Only row counts pass through the object store.
    tasks = [{"uris": [files[i]["uri"] for i in g], "origins": [files[i]["origin"] for i in g]} for g in scatter_groups(counts, SCATTER_ROWS)]
    scattered = ray.data.from_items(tasks, override_num_blocks=min(len(tasks), 64))
    scattered = scattered.map_batches(_scatter_files, fn_kwargs={"storage": storage, "shards": n, "prefix": prefix}, batch_format="pyarrow", batch_size=1)
    for _ in scattered.iter_batches(batch_size=None):
        pass
    # 3. Gather: each shard's fragments become its sorted pages and page index.
    shards = ray.data.range(n, override_num_blocks=min(n, 64))
    page_rows = prior_index.PAGE_ROWS
    gathered = shards.map_batches(_gather_shards, fn_kwargs={"prefix": prefix, "storage": storage, "page_rows": page_rows}, batch_format="pyarrow", batch_size=1)
    present = frozenset(int(s) for b in gathered.iter_batches(batch_size=None, batch_format="numpy") for s in b["shard"])
    log.info("reusable rows: %d (from run %s and %d journal files of earlier attempts) in %d shards", rows, committed, len(journal), n)
    return PriorState(prefix=prefix, shards=n, present=present, storage=storage, committed_run=committed, rows=rows)


def _count_rows(batch: pa.Table, storage: StorageConfig) -> pa.Table:
    import pyarrow.parquet as pq

    counts = []
    for uri in batch["uri"].to_pylist():
        fs, path = arrow_filesystem(uri, storage)
        try:
            with fs.open_input_file(path) as f:
                counts.append(pq.ParquetFile(f).metadata.num_rows)
        except (OSError, pa.ArrowInvalid) as exc:
            raise StorageError(f"cannot read earlier results {uri}: {exc}") from None
    return pa.table({"uri": batch["uri"], "rows": pa.array(counts, pa.int64())})


def scatter_groups(counts: list[int], limit: int) -> list[list[int]]:
    """File indexes in consecutive groups of at most `limit` rows (a larger file alone)."""
    groups: list[list[int]] = []
    total = limit
    for i, c in enumerate(counts):
        if total + c > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += c
    return groups


def _scatter_files(batch: pa.Table, storage: StorageConfig, shards: int, prefix: str) -> pa.Table:
    (uris,), (origins,) = batch["uris"].to_pylist(), batch["origins"].to_pylist()
    tables = []
    for uri, origin in zip(uris, origins):
        t = _read_variants([uri], storage)
        tables.append(t.append_column("origin", pa.array([origin] * len(t), pa.string())))
    t = pa.concat_tables(tables)
    t = with_shards(t, shards)
    task = hashlib.sha256("\n".join(uris).encode("utf-8", "surrogatepass")).hexdigest()[:24]
    prior_index.scatter(t, prefix, storage, task)
    return pa.table({"rows": pa.array([len(t)], pa.int64())})


def _gather_shards(batch: pa.Table, prefix: str, storage: StorageConfig, page_rows: int) -> pa.Table:
    present = [s for s in batch["id"].to_pylist() if prior_index.gather(int(s), prefix, storage, page_rows)]
    return pa.table({"shard": pa.array(present, pa.int32())})


# ---------------------------------------------------------------------------- on workers


def prior_rows_many(prior: PriorState, skus: list[str]) -> dict[str, dict[tuple[str, int], list[dict[str, Any]]]]:
    """{sku: {(recipe, variant): its reusable rows, one per gate attempt, in attempt order}}
    for a batch's skus, read together (one page per sku at most, cached on the worker). A
    variant's rows from this run's earlier attempts replace the committed run's."""
    if not prior:
        return {}
    by_shard: dict[int, list[str]] = {}
    for sku in set(skus):
        shard = shard_of(sku, prior.shards)
        if shard in prior.present:
            by_shard.setdefault(shard, []).append(sku)
    return {sku: _resolve(rows) for sku, rows in prior_index.lookup(prior.prefix, prior.storage, by_shard).items()}


def prior_rows(prior: PriorState, sku: str) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """prior_rows_many for one sku."""
    return prior_rows_many(prior, [sku]).get(sku, {})


def _resolve(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    by_origin: dict[str, dict[tuple[str, int], dict[int, dict]]] = {"committed": {}, "journal": {}}
    for row in rows:
        attempts = by_origin[row["origin"]].setdefault((row["recipe"], int(row["variant"])), {})
        attempts[int(row.get("attempt") or 1)] = row  # a retried journal write repeats a row: keep one
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for origin in ("committed", "journal"):  # journal last: it wins
        for k, attempts in by_origin[origin].items():
            out[k] = [attempts[a] for a in sorted(attempts)]
    return out


def carried_row(prior: dict[str, Any], run_id: str, source_uri: str) -> dict[str, Any]:
    """A reused variant as a row of this run: same image object and scores; `reused_from`
    names the run that generated it (rows from this run's own earlier attempts keep theirs)."""
    row = {k: v for k, v in prior.items() if k != "origin"}
    if isinstance(row.get("op_seconds"), list):
        # A map column comes back from Parquet (and through JSON) as [key, value] pairs.
        row["op_seconds"] = dict(row["op_seconds"])
    if prior.get("origin") == "committed":
        row["reused_from"] = prior.get("reused_from") or prior.get("run_id")
        row["run_attempt"] = None
    row["run_id"] = run_id
    row["source_uri"] = source_uri
    row["kind"] = "variant"
    return row
