"""Where does a run's driver memory and object store go, phase by phase? Runs one catalog of
`--count` SKUs (as bench/catalog_scale.py writes them) full, then with no change, and for every
phase of `run_catalog` (load_prior, find_duplicate_skus, execute, run_gate_retries, ...)
prints the driver's RSS at its start and end, and the driver's and the object store's peaks
while it ran.

    python bench/catalog_phases.py --count 40000 [--json bench/results/catalog_phases-40k-cpu2.json]

With `--sites`, each phase's object-store peak is also broken down by where its objects were
made (`ray memory`, grouped by call site; Ray records the sites when
RAY_record_ref_creation_sites=1, which the flag sets): e.g. `read_api.py:from_items`, the
input blocks a pass put in the store up front.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import psutil

import pipelines.run as run_module
from bench.catalog_scale import Peaks, write_catalog_in_child
from pipelines.run import RunConfig, run_catalog

PHASES = ("load_prior", "find_duplicate_skus", "execute", "run_gate_retries", "dedupe_repeated_rows", "flag_duplicates", "_summarise",
          "write_tables", "write_report_on_a_worker")  # fmt: skip


def store_sites(top: int = 6) -> list[dict]:
    """The object store's objects now, grouped by the call site that made them, largest first:
    [{"site": the last frames, "kb": size, "objects": how many}]."""
    import ray
    from ray._private.internal_api import memory_summary

    try:
        text = memory_summary(ray.get_runtime_context().gcs_address, group_by="STACK_TRACE", sort_by="OBJECT_SIZE", units="KB", num_entries=1)
    except Exception:  # noqa: BLE001 - a missed snapshot only loses detail
        return []
    found = []
    for m in re.finditer(r"--- Summary for stack trace: (.*?) ---\nMem Used by Objects.*?\n([\d.]+) (KB|MB)\s+(\d+), .*?\s+(\d+), .*?\s+(\d+), ", text, re.S):
        frames = [f.rsplit("site-packages/", 1)[-1] for f in m.group(1).split(" | ") if "client_mode_hook" not in f and "auto_init_hook" not in f]
        kb = float(m.group(2)) * (1024 if m.group(3) == "MB" else 1)
        found.append({"site": " | ".join(frames)[-120:], "kb": round(kb, 1), "objects": int(m.group(4)) + int(m.group(5)) + int(m.group(6))})
    return sorted(found, key=lambda f: -f["kb"])[:top]


class PhaseProbe:
    """Wraps each phase function of pipelines.run; a sampler thread keeps per-phase peaks."""

    def __init__(self, sites: bool = False):
        self.sites = sites
        self.records: list[dict] = []
        self.current: dict | None = None
        self._peaks = Peaks(every_s=0.3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._originals: dict = {}

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            cur = self.current
            if cur is not None:
                cur["driver_peak_mb"] = max(cur["driver_peak_mb"], me.memory_info().rss / 2**20)
                store = self._peaks._store_bytes() / 2**20
                if self.sites and store > cur["store_peak_mb"] * 1.1 + 0.05:
                    cur["store_sites"] = store_sites()
                cur["store_peak_mb"] = max(cur["store_peak_mb"], store)
            time.sleep(0.3)

    def wrap(self, name: str) -> None:
        fn = self._originals[name] = getattr(run_module, name)

        @functools.wraps(fn)
        def probed(*args, **kwargs):
            rss = psutil.Process().memory_info().rss / 2**20
            rec = {"phase": name, "start_mb": rss, "driver_peak_mb": rss, "store_peak_mb": 0.0}
            self.current, t0 = rec, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                rec["seconds"] = time.perf_counter() - t0
                rec["end_mb"] = psutil.Process().memory_info().rss / 2**20
                self.current = None
                self.records.append({k: round(v, 1) if isinstance(v, float) else v for k, v in rec.items()})

        setattr(run_module, name, probed)

    def __enter__(self):
        for name in PHASES:
            self.wrap(name)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for name, fn in self._originals.items():  # the next probe wraps the real functions, not these
            setattr(run_module, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=40_000)
    ap.add_argument("--recipe", default=str(Path(__file__).parent / "recipes" / "scale.yaml"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sites", action="store_true", help="break each phase's store peak down by call site")
    args = ap.parse_args()
    if args.sites:
        os.environ["RAY_record_ref_creation_sites"] = "1"  # read by ray.init below
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="skustudio-bench-phases-"))

    manifest = write_catalog_in_child(work / f"cat-{args.count}", args.count)

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out = {}
    for run_id in ("full", "nochange"):
        cfg = RunConfig(manifest=str(manifest), recipes=(args.recipe,), output=str(work / "runs"), cpu_batch_size=args.batch_size, run_id=run_id)
        with PhaseProbe(sites=args.sites) as probe:
            run_catalog(cfg)
        out[run_id] = probe.records
        print(f"\n{args.count} SKUs, {run_id} run:")
        for r in probe.records:
            print(f"  {r['phase']:26s} {r['seconds']:7.1f} s  driver {r['start_mb']:6.0f} -> {r['end_mb']:6.0f} MB (peak {r['driver_peak_mb']:6.0f})"
                  f"  object store peak {r['store_peak_mb']:7.1f} MB", flush=True)  # fmt: skip
            for site in r.get("store_sites", []):
                print(f"      {site['kb']:9.1f} KB in {site['objects']:5d} objects  {site['site']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"count": args.count, "batch_size": args.batch_size, "phases": out}, indent=2))


if __name__ == "__main__":
    main()
