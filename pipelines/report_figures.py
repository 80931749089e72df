"""The report's figures, gathered in a few streaming scans over a committed run's tables.

A 10M-variant night must not need a 10M-row table in one process: loading the report's
columns whole took ~3 KB of memory per variant (bench/catalog_scale.py at 30k), ~30 GB at
10M. Here every figure is folded in batch by batch (`BATCH_ROWS` rows at a time, in Arrow), so
what is held is one batch plus what the page shows:

- counters (key figures, per recipe, compliance per channel, failed rules, cost per op);
- histogram bins (a first pass finds each score's range, a second counts into 20 bins:
  the same bins as `np.histogram` over the whole column);
- the review list (its `REVIEW_ROWS` most doubtful rows) and the contact sheets' rows (the
  `max_skus` SKUs shown, read in a last filtered scan);
- one string per SKU that needs attention (errors, rejected variants) and one per distinct SKU
  (for the sheet's "N more SKUs" count): Arrow strings, ~20 bytes each.

Scans: (1) retried rows only, to know which attempts were superseded; (2) every variant's
report columns; (3) the score columns, for the histogram bins; (4) the error rows; then small
filtered scans for the SKUs the contact sheets show.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ops.compliance import channels
from pipelines.hashes import DistinctHashes
from pipelines.schema import ERROR_SCHEMA, VARIANT_SCHEMA, conform
from pipelines.state import RUN_RECORD
from pipelines.storage import StorageConfig, arrow_filesystem, exists, join, list_objects, read_bytes

BATCH_ROWS = 65_536
HISTOGRAM_BINS = 20
HISTOGRAM_SCORES = (
    ("score_sharpness", "sharpness"),
    ("score_colorfulness", "colourfulness"),
    ("score_noise_sigma", "noise sigma"),
    ("score_fidelity_ciede2000", "product fidelity, mean CIEDE2000 (lower is better)"),
    ("score_fidelity_ssim", "product fidelity, SSIM"),
    ("score_brisque", "BRISQUE (lower is better)"),
    ("score_niqe", "NIQE (lower is better)"),
    ("score_mask_confidence", "product mask confidence"),
)
SHEET_SCORES = (("score_sharpness", "sharp"), ("score_fidelity_ciede2000", "ΔE"), ("score_colorfulness", "colour"), ("score_mask_confidence", "mask"))
# Doubtful cutouts listed for review (most doubtful first), at most this many rows.
REVIEW_ROWS = 200
REVIEW_COLUMNS = ["sku", "recipe", "variant", "score_mask_confidence", "output_uri"]
# Error types that mean the run refused to read a source: the report must not show it either.
SOURCE_REFUSALS = ("SourceNotAllowed", "SourceTooLarge", "SourceTimeout")
# The variant columns the report reads (plus every compliance_* verdict).
REPORT_COLUMNS = {
    "run_id", "sku", "recipe", "variant", "source_uri", "output_uri", "attempt", "passed", "reasons", "duration_s", "op_seconds",
    "reused_from", *(col for col, _ in HISTOGRAM_SCORES), *(col for col, _ in SHEET_SCORES),
}  # fmt: skip
REPORT_SCHEMA = pa.schema([f for f in VARIANT_SCHEMA if f.name in REPORT_COLUMNS or (f.name.startswith("compliance_") and f.name != "compliance_notes")])
ATTEMPT_KEY = ["sku", "recipe", "variant", "attempt"]


@dataclasses.dataclass
class Histogram:
    """Bin counts of one score over the final variants, with the range they span."""

    counts: np.ndarray
    lo: float
    hi: float

    @property
    def n(self) -> int:
        return int(self.counts.sum())


@dataclasses.dataclass
class RecipeFigures:
    variants: int = 0  # final attempts
    passed: int = 0
    attempts: int = 0
    errors: int = 0
    compliance: dict[str, int] = dataclasses.field(default_factory=dict)  # channel -> final variants passing it


@dataclasses.dataclass
class ErrorGroup:
    stage: str
    error_type: str
    rows: int
    example: dict


@dataclasses.dataclass
class Sheets:
    """What the contact sheets show: the SKUs (attention first), their variant and error rows,
    and the sources the run refused to read (never thumbnailed)."""

    shown: list[str]
    variants_of: dict[str, list[dict]]
    errors_of: dict[str, list[dict]]
    refused_sources: set[str]
    total_skus: int


@dataclasses.dataclass
class RunFigures:
    record: dict
    key: dict[str, float | int | None]
    recipes: dict[str, RecipeFigures]
    cost: dict[str, float]  # op -> mean worker-seconds per generated variant
    histograms: dict[str, Histogram]
    failed_rules: list[tuple[str, str, int]]  # (channel, rule, final variants failing it), most failed first
    error_groups: list[ErrorGroup]  # most rows first
    review: list[dict]
    review_total: int
    sheets: Sheets


# ------------------------------------------------------------------------------ scanning


def parquet_files(prefix: str, storage: StorageConfig) -> list[str]:
    return [u for u in list_objects(prefix, storage) if u.endswith(".parquet")]


def scan(files: list[str], schema: pa.Schema, storage: StorageConfig, *, filter=None, filter_columns: tuple[str, ...] = (),
         batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:  # fmt: skip
    """The files' rows in batches of at most `batch_rows`, with `schema`'s columns (a column an
    older run did not write comes back null) in `schema`'s types, then `filter` (an Arrow
    expression over those columns). With `filter_columns` (the columns `filter` reads), each
    row group is first judged on those alone and skipped when no row matches: finding a few
    SKUs reads one column of most files.

    Read one file and one batch at a time, on this thread: a dataset scanner reads ahead of a
    slower consumer without bound (170 MB queued for a 1M-variant run), which is the memory this
    module exists to avoid."""
    for uri in files:
        fs, path = arrow_filesystem(uri, storage)
        with fs.open_input_file(path) as f:
            reader = pq.ParquetFile(f)
            names = reader.schema_arrow.names
            present = [n for n in schema.names if n in names]
            for group in range(reader.num_row_groups):
                if filter is not None and filter_columns:
                    probe = reader.read_row_group(group, columns=[c for c in filter_columns if c in names])
                    if not len(conform(probe, _sub(schema, filter_columns)).filter(filter)):
                        continue
                for batch in reader.iter_batches(batch_size=batch_rows, row_groups=[group], columns=present):
                    t = conform(pa.Table.from_batches([batch]), schema)
                    if filter is not None:
                        t = t.filter(filter)
                    if len(t):
                        yield t


def _sub(schema: pa.Schema, names) -> pa.Schema:
    return pa.schema([schema.field(n) for n in names])


def count_true(mask) -> int:
    return int(pc.sum(pc.fill_null(mask, False)).as_py() or 0)


# ------------------------------------------------------------------------------ final attempts


def attempt_key(t: pa.Table, attempt) -> pa.Array:
    return pc.binary_join_element_wise(t["sku"], t["recipe"], pc.cast(t["variant"], pa.string()), pc.cast(attempt, pa.string()), "\x00")


def superseded_keys(retried: pa.Table) -> pa.Array:
    """Keys of the attempts that a later attempt replaced, from rows with attempt > 1."""
    if not len(retried):
        return pa.array([], pa.string())
    keys = attempt_key(retried, pc.subtract(pc.fill_null(retried["attempt"], 1), 1))
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def final_mask(variants: pa.Table, superseded: pa.Array | None = None) -> pa.Array:
    """True for each variant's last gate attempt (what the storefront got, or why not): a row
    is superseded when the same (sku, recipe, variant) has the next attempt. `superseded`
    (superseded_keys of the run's retried rows) lets one batch be judged against the whole run;
    without it the table is judged against itself."""
    attempt = pc.fill_null(variants["attempt"], 1)
    if superseded is None:
        superseded = superseded_keys(variants.filter(pc.greater(attempt, 1)))
    if not len(superseded):
        return pa.array(np.ones(len(variants), bool))
    return pc.invert(pc.fill_null(pc.is_in(attempt_key(variants, attempt), value_set=superseded), False))


# ------------------------------------------------------------------------------ gathering


def load_record(run_prefix: str, storage: StorageConfig) -> dict:
    """The committed run's _run.json; a clear error when the prefix holds no run."""
    record_uri = join(run_prefix, RUN_RECORD)
    if not exists(record_uri, storage):
        raise ValueError(f"{run_prefix} holds no committed run ({RUN_RECORD} missing); pass OUT/RUN_ID of a finished run")
    return json.loads(read_bytes(record_uri, storage))


def gather(run_prefix: str, storage: StorageConfig, *, max_skus: int = 60, batch_rows: int = BATCH_ROWS) -> RunFigures:
    """Every figure the report shows, from streaming scans of the run's tables."""
    record = load_record(run_prefix, storage)
    vfiles = parquet_files(join(run_prefix, "variants"), storage)
    efiles = parquet_files(join(run_prefix, "errors"), storage)

    # 1. Which attempts a gate retry replaced: only the rows with attempt > 1 are read.
    retried = [superseded_keys(t) for t in scan(vfiles, _sub(REPORT_SCHEMA, ATTEMPT_KEY), storage, filter=pc.field("attempt") > 1, filter_columns=("attempt",), batch_rows=batch_rows)]
    superseded = pa.concat_arrays(retried) if retried else pa.array([], pa.string())

    # 2. Every variant's report columns, once, folded into counters.
    variants = _VariantTotals(keep_names=2 * max_skus)
    for t in scan(vfiles, REPORT_SCHEMA, storage, batch_rows=batch_rows):
        variants.add(t, final_mask(t, superseded))

    # 3. Histogram bins over the ranges pass 2 found.
    histograms = _histograms(vfiles, storage, variants.ranges, superseded, batch_rows)

    # 4. The error rows.
    errors = _ErrorTotals()
    for t in scan(efiles, ERROR_SCHEMA, storage, batch_rows=batch_rows):
        errors.add(t)

    # 5. The contact sheets: which SKUs, then only their rows.
    sheets = _sheets(vfiles, efiles, storage, variants, errors, max_skus, batch_rows)

    recipes = {name: variants.recipes.get(name) or RecipeFigures() for name in sorted(set(variants.recipes) | set(record.get("recipes", {})))}
    for name, r in recipes.items():
        r.errors = errors.by_recipe.get(name, 0)
    return RunFigures(
        record=record,
        key=_key_figures(record, variants, errors),
        recipes=recipes,
        cost=variants.cost(),
        histograms=histograms,
        failed_rules=[(ch, rule, n) for (ch, rule), n in Counter(variants.failed).most_common() if n],
        error_groups=sorted(errors.groups.values(), key=lambda g: -g.rows),
        review=variants.review.to_pylist(),
        review_total=variants.review_total,
        sheets=sheets,
    )


def _key_figures(record: dict, v: _VariantTotals, errors: _ErrorTotals) -> dict[str, float | int | None]:
    execute_s = float(record.get("timings", {}).get("execute_s") or 0.0)
    gpus = float(record.get("resources", {}).get("cluster_gpus") or 0.0)
    return {
        "inputs": record.get("counts", {}).get("inputs"),
        "variants": v.final,
        "passed": v.passed,
        "rejected": v.final - v.passed,
        "pass_rate": v.passed / v.final if v.final else None,
        "errors": errors.rows,
        "retries": v.rows - v.final,
        "generated": v.generated,
        "reused": v.rows - v.generated,
        "execute_s": execute_s,
        # Throughput counts every image this run made (retries included) over the execution wall time.
        "throughput": v.generated / execute_s if execute_s > 0 and v.generated else None,
        # Summed per-row op time: what a variant cost in worker time, wherever it ran.
        "worker_s_per_variant": v.duration_sum / v.duration_n if v.duration_n else None,
        # GPUs held for the execution, shared over the images made: an upper bound on GPU time.
        "gpu_s_per_variant": execute_s * gpus / v.generated if gpus and v.generated else None,
    }


class _VariantTotals:
    """Pass 2's accumulators, fed one batch (and its final-attempt mask) at a time."""

    def __init__(self, keep_names: int):
        self.rows = self.final = self.passed = self.generated = self.duration_n = self.profiled = 0
        self.duration_sum = 0.0
        self.recipes: dict[str, RecipeFigures] = {}
        self.channels = list(channels())
        self.failed = {(ch, rule.name): 0 for ch, spec in channels().items() for rule in spec.rules}
        self.op_seconds: dict[str, float] = {}
        self.ranges: dict[str, tuple[float, float]] = {}
        self.review = _sub(REPORT_SCHEMA, REVIEW_COLUMNS).empty_table()
        self.review_total = 0
        self.rejected_skus: list[pa.Array] = []  # one entry per rejected final variant
        self.sku_hashes = SkuHashes()  # every distinct SKU, for the sheets' "N more" count
        self.first_names = pa.array([], pa.string())  # the alphabetically first SKUs, for the sheets
        self.keep_names = keep_names

    def add(self, t: pa.Table, final: pa.Array) -> None:
        self.rows += len(t)
        gen = t.filter(pc.is_null(t["reused_from"]))
        self.generated += len(gen)
        self.duration_n += len(gen) - gen["duration_s"].null_count
        self.duration_sum += float(pc.sum(gen["duration_s"]).as_py() or 0.0)
        self._cost(gen)
        for name in _names(t["recipe"]):
            self._recipe(name).attempts += count_true(pc.equal(t["recipe"], name))
        f = t.filter(final).combine_chunks()
        self.final += len(f)
        self.passed += count_true(f["passed"])
        for name in _names(f["recipe"]):
            fin, r = f.filter(pc.equal(f["recipe"], name)), self._recipe(name)
            r.variants += len(fin)
            r.passed += count_true(fin["passed"])
            for ch in self.channels:
                r.compliance[ch] = r.compliance.get(ch, 0) + count_true(fin[f"compliance_{ch}"])
        for ch, rule in self.failed:
            self.failed[(ch, rule)] += count_true(pc.equal(f[f"compliance_{ch}_{rule}"], False))
        self._ranges(f)
        self._review(f)
        self._skus(t, f)

    def cost(self) -> dict[str, float]:
        """Mean worker-seconds per generated variant by op ('decode', each op, 'score_models',
        'finish'), most expensive first; {} when no row carries a profile."""
        if not self.profiled:
            return {}
        return dict(sorted(((op, s / self.profiled) for op, s in self.op_seconds.items()), key=lambda kv: -kv[1]))

    def _recipe(self, name: str) -> RecipeFigures:
        return self.recipes.setdefault(name, RecipeFigures())

    def _cost(self, gen: pa.Table) -> None:
        spent = gen["op_seconds"].combine_chunks()
        profiled = len(spent) - spent.null_count
        if not profiled:
            return
        self.profiled += profiled
        per_op = pa.table({"op": spent.keys, "s": spent.items}).group_by("op").aggregate([("s", "sum")])
        for op, s in zip(per_op["op"].to_pylist(), per_op["s_sum"].to_pylist()):
            self.op_seconds[op] = self.op_seconds.get(op, 0.0) + (s or 0.0)

    def _ranges(self, f: pa.Table) -> None:
        for col, _ in HISTOGRAM_SCORES:
            vals = finite_values(f[col])
            if len(vals):
                lo, hi = float(vals.min()), float(vals.max())
                seen = self.ranges.get(col)
                self.ranges[col] = (min(seen[0], lo), max(seen[1], hi)) if seen else (lo, hi)

    def _review(self, f: pa.Table) -> None:
        """Keep the REVIEW_ROWS most doubtful cutouts: final variants whose gate failed on the
        mask's confidence, lowest confidence first (a stable sort: ties keep table order)."""
        hit = pc.fill_null(pc.starts_with(pc.list_flatten(f["reasons"]), "score_mask_confidence"), False)
        rows_hit = pc.unique(pc.filter(pc.list_parent_indices(f["reasons"]), hit))
        if not len(rows_hit):
            return
        picked = f.take(rows_hit).select(REVIEW_COLUMNS)
        self.review_total += len(picked)
        merged = pa.concat_tables([self.review, picked]).sort_by([("score_mask_confidence", "ascending"), ("sku", "ascending")])
        self.review = merged.slice(0, REVIEW_ROWS).combine_chunks()

    def _skus(self, t: pa.Table, f: pa.Table) -> None:
        names = pc.drop_null(pc.unique(t["sku"]))
        self.sku_hashes.add(names)
        rejected = f.filter(pc.invert(pc.fill_null(f["passed"], False)))["sku"]
        if len(rejected):
            self.rejected_skus.append(pc.drop_null(rejected.combine_chunks()))
        both = pc.unique(pa.concat_arrays([self.first_names, names]))
        self.first_names = both.take(pc.sort_indices(both)[: self.keep_names])


class _ErrorTotals:
    """Pass 4's accumulators: error rows by (stage, error type) with the first as example,
    per recipe, and the SKUs that have any."""

    def __init__(self):
        self.rows = 0
        self.groups: dict[tuple[str, str], ErrorGroup] = {}
        self.by_recipe: Counter[str] = Counter()
        self.skus: list[pa.Array] = []

    def add(self, t: pa.Table) -> None:
        t = t.combine_chunks()
        self.rows += len(t)
        # Group key: stage and error type, "?" where missing (as the page shows them).
        stage, etype = (_or_unknown(t[c]) for c in ("stage", "error_type"))
        keys = pc.binary_join_element_wise(stage, etype, "\x00")
        counts = pc.value_counts(keys)
        for key, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
            group = tuple(key.split("\x00", 1))
            if group in self.groups:
                self.groups[group].rows += n
            else:
                first = pc.index(keys, key).as_py()
                self.groups[group] = ErrorGroup(stage=group[0], error_type=group[1], rows=n, example=t.slice(first, 1).to_pylist()[0])
        for name, n in zip(*(pc.value_counts(pc.drop_null(t["recipe"])).field(f).to_pylist() for f in ("values", "counts"))):
            self.by_recipe[name] += n
        skus = pc.drop_null(t["sku"])
        skus = skus.filter(pc.not_equal(skus, ""))
        if len(skus):
            self.skus.append(pc.unique(skus))


def _histograms(files: list[str], storage: StorageConfig, ranges: dict[str, tuple[float, float]], superseded: pa.Array, batch_rows: int) -> dict[str, Histogram]:
    """Bin counts of the final variants' scores. Bins over a fixed range sum across batches to
    what `np.histogram` gives over the whole column."""
    cols = [col for col, _ in HISTOGRAM_SCORES if col in ranges]
    counts = {col: np.zeros(HISTOGRAM_BINS, np.int64) for col in cols}
    for t in scan(files, _sub(REPORT_SCHEMA, ATTEMPT_KEY + cols), storage, batch_rows=batch_rows) if cols else ():
        f = t.filter(final_mask(t, superseded))
        for col in cols:
            lo, hi = ranges[col]
            counts[col] += np.histogram(finite_values(f[col]), bins=HISTOGRAM_BINS, range=(lo, hi if hi > lo else lo + 1))[0]
    return {col: Histogram(counts[col], *ranges[col]) for col in cols}


def _sheets(vfiles, efiles, storage: StorageConfig, v: _VariantTotals, errors: _ErrorTotals, max_skus: int, batch_rows: int) -> Sheets:
    """SKUs needing attention first (errors, then most rejected variants, then by name), then
    the rest by name; only the shown SKUs' rows are read."""
    # 1. Attention order, in Arrow: a Python list of every rejected SKU would be catalog-sized.
    with_errors = pc.unique(pa.concat_arrays(errors.skus)) if errors.skus else pa.array([], pa.string())
    rejected = pc.value_counts(pa.concat_arrays(v.rejected_skus)) if v.rejected_skus else None
    names = pc.unique(pa.concat_arrays([with_errors, rejected.field("values") if rejected is not None else pa.array([], pa.string())]))
    if len(names):
        n_rejected = rejected.field("counts").take(pc.index_in(names, value_set=rejected.field("values"))) if rejected is not None else pa.nulls(len(names), pa.int64())
        order = pa.table({"sku": names, "error": pc.cast(pc.is_in(names, value_set=with_errors), pa.int8()), "rejected": pc.fill_null(pc.cast(n_rejected, pa.int64()), 0)})
        attention = order.sort_by([("error", "descending"), ("rejected", "descending"), ("sku", "ascending")])["sku"].to_pylist()[:max_skus]
    else:
        attention = []
    chosen = set(attention)
    shown = attention + [s for s in v.first_names.to_pylist() if s not in chosen][: max_skus - len(attention)]

    # 2. How many SKUs there are: every variant SKU, plus SKUs that only have errors.
    total = v.sku_hashes.count() + int((~v.sku_hashes.contains(with_errors)).sum())

    # 3. The shown SKUs' rows, and which of their sources the run refused to read.
    wanted = pa.array(shown, pa.string())
    variants_of: dict[str, list[dict]] = {}
    errors_of: dict[str, list[dict]] = {}
    for files, schema, into in ((vfiles, REPORT_SCHEMA, variants_of), (efiles, ERROR_SCHEMA, errors_of)):
        for t in scan(files, schema, storage, filter=pc.field("sku").isin(wanted), filter_columns=("sku",), batch_rows=batch_rows) if shown else ():
            for r in t.to_pylist():
                into.setdefault(r["sku"], []).append(r)
    sources = {(variants_of.get(s) or errors_of.get(s) or [{}])[0].get("source_uri") for s in shown} - {None}
    refused: set[str] = set()
    refusals = pc.field("error_type").isin(pa.array(SOURCE_REFUSALS)) & pc.field("source_uri").isin(pa.array(sorted(sources), pa.string()))
    for t in scan(efiles, _sub(ERROR_SCHEMA, ["source_uri", "error_type"]), storage, filter=refusals, filter_columns=("error_type", "source_uri"), batch_rows=batch_rows) if sources else ():
        refused.update(u for u in t["source_uri"].to_pylist() if u)
    return Sheets(shown=shown, variants_of=variants_of, errors_of=errors_of, refused_sources=refused, total_skus=total)


class SkuHashes(DistinctHashes):
    """The distinct SKUs of a run as 64-bit hashes: 8 bytes per SKU where a set of strings
    takes ~150 (Arrow's hash table included), so counting a 10M-SKU run's SKUs stays ~100 MB.
    Two SKUs sharing a hash (odds ~1e-5 at 10M) would be counted once: it only feeds the
    "N more SKUs not shown" line."""

    def add(self, names: pa.Array) -> None:
        super().add(_hashes(names))

    def contains(self, names: pa.Array) -> np.ndarray:
        return np.isin(_hashes(names), self.distinct())


def _hashes(names: pa.Array) -> np.ndarray:
    # Python's str hash: fixed within the process, which is all a count needs.
    return np.fromiter((hash(n) for n in names.to_pylist()), np.int64, len(names))


def finite_values(column) -> np.ndarray:
    values = pc.fill_null(column, float("nan")).to_numpy(zero_copy_only=False)
    return values[np.isfinite(values)]


def _names(column) -> list[str]:
    return [n for n in pc.unique(column).to_pylist() if n is not None]


def _or_unknown(column) -> pa.Array:
    column = pc.fill_null(column, "")
    return pc.if_else(pc.equal(column, ""), "?", column)
