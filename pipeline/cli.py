"""The `narvl` command line: run / plan the pipeline, show configs, make data, compare runs.

Errors the user can fix (a bad config, a missing cached input, a bad data source) print one red message and exit
with code 2, without a traceback. A run with failed stages exits with code 1.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from pipeline.config import ConfigError, PipelineConfig, config_to_yaml, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="NARVL: non-autoregressive vision-language models as a Ray / MLflow pipeline.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect pipeline configs.")
data_app = typer.Typer(no_args_is_help=True, help="Make datasets: the built-in benchmark or converted real data.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

ProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help="configs/pipelines/<profile>.yaml")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="a pipeline YAML file")]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. train_nar.max_steps=100")]
RootOpt = Annotated[str, typer.Option("--root", help="artifact root: a folder, a shared-filesystem path or "
                                                     "s3://bucket/prefix (stage cache, runs/; mlflow.db when local)")]
TasksOpt = Annotated[str | None, typer.Option("--tasks", help="comma-separated subset, e.g. caption,vqa")]
ForceOpt = Annotated[list[str] | None, typer.Option("--force", help="rerun this stage and its descendants")]
OnlyOpt = Annotated[str | None, typer.Option("--only", help="run only this stage, from cached inputs")]
UriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI (default sqlite:///<root>/mlflow.db)")]
AddressOpt = Annotated[str | None, typer.Option(help="join a Ray cluster (or RAY_ADDRESS)")]
DEFAULT_ROOT = "artifacts"


def _err(msg: str, code: int = 2) -> typer.Exit:
    # the message is literal text (it quotes paths, node names like evaluate_narvl[ce], user values)
    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error:", "bold red"), " ", msg), highlight=False)
    return typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.executor import ExecutionError, PipelineError
    from pipeline.storage import StorageError
    from pipeline.study import StudyError
    from pipeline.tracking import TrackingError
    from stages.data.converters import ConversionError


    errors: list[type[BaseException]] = [ConfigError, PipelineError, StudyError, ExecutionError, StorageError,
                                         ConversionError, TrackingError]
    return tuple(errors)


def _guard(fn: Callable[[], Any]) -> Any:
    """Run fn; user-fixable errors become a red message and exit code 2."""
    try:
        return fn()
    except _user_errors() as e:
        raise _err(str(e)) from None


def _load(profile: str | None, config: Path | None, overrides: list[str] | None, tasks: str | None = None
          ) -> PipelineConfig:
    if profile and config:
        raise ConfigError("give either --profile or --config, not both")
    overrides = list(overrides or [])
    if tasks:
        overrides.append(f"tasks=[{','.join(t.strip() for t in tasks.split(',') if t.strip())}]")
    return load_config(path=config, profile=profile, overrides=overrides)


# ---- run / plan ------------------------------------------------------------------------------------------
@app.command()
def run(profile: ProfileOpt = None, config: ConfigOpt = None, overrides: OverridesArg = None,
        root: RootOpt = DEFAULT_ROOT, address: AddressOpt = None,
        tracking_uri: UriOpt = None, force: ForceOpt = None, only: OnlyOpt = None, tasks: TasksOpt = None) -> None:
    """Run the pipeline: every stage that is not cached, then the report."""
    from pipeline.dag import run_pipeline
    from pipeline.progress import ProgressView
    from pipeline.storage import adopt_carried_env
    from pipeline.submit import submitted_git

    adopt_carried_env()  # a submitted job: the submitter's storage settings, where this node has none
    cfg = _guard(lambda: _load(profile, config, overrides, tasks))
    console = Console()
    try:
        with ProgressView(console) as view:
            result = _guard(lambda: run_pipeline(cfg, root, address=address, tracking_uri=tracking_uri,
                                                 force=force or [], only=only, on_update=view.update,
                                                 command=shlex.join(sys.argv), git=submitted_git()))
    except KeyboardInterrupt:
        raise _err("interrupted: running stages cancelled, MLflow runs marked KILLED; a rerun resumes"
                   " (training from its last checkpoint)", code=130) from None
    if result.synced and (result.synced["records"] or result.synced["unreachable"]):
        console.print(f"earlier runs on this root: {_synced(result.synced)}", highlight=False, markup=False)
    if result.summary is not None:
        console.print(summary_table(result.summary))
        console.print(gap_table(result.summary))
    console.print(f"report: {result.report_dir / 'report.md'}", soft_wrap=True, highlight=False, markup=False)
    console.print(f"MLflow parent run: {result.parent_run_id}", highlight=False, markup=False)
    if not result.ok:
        for st in result.failures:
            last = (st.error or "").strip().splitlines()[-1:] if st.state == "failed" else []
            where = f" ({last[0]})" if last else ""
            console.print(Text.assemble((f"{st.id}: {st.state}", "red"), where), soft_wrap=True, highlight=False)
        raise typer.Exit(1)


@app.command()
def plan(profile: ProfileOpt = None, config: ConfigOpt = None, overrides: OverridesArg = None,
         root: RootOpt = DEFAULT_ROOT, force: ForceOpt = None, only: OnlyOpt = None,
         tasks: TasksOpt = None) -> None:
    """Show the DAG per task and which nodes are cached (HIT) or will run (RUN), without running anything."""
    from pipeline.dag import build_graph, make_plan

    cfg = _guard(lambda: _load(profile, config, overrides, tasks))
    graph = _guard(lambda: build_graph(cfg))
    from pipeline.storage import Storage

    storage = _guard(lambda: Storage(root))
    if not storage.remote and storage.path.exists() and not storage.path.is_dir():
        raise _err(f"artifact root {storage.uri} is a file, not a folder")
    actions = _guard(lambda: make_plan(graph, storage, force or [], only))
    console = Console(soft_wrap=True)
    for task in dict.fromkeys(n.task for n in graph.nodes.values()):  # the tasks, and "shared" after the first
        table = Table(title=Text(task), title_justify="left")
        for col in ("node", "action", "key", "inputs"):
            table.add_column(col, no_wrap=col != "inputs")
        for node in graph.nodes.values():
            if node.task != task:
                continue
            action = {"hit": Text("HIT", "cyan"), "run": Text("RUN", "yellow"), "skip": Text("SKIP", "dim")}
            table.add_row(Text(node.name), action[actions[node.id]], Text(node.key[:12]),
                          Text(", ".join(f"{k}={v}" for k, v in node.inputs.items()) or "-"))
        console.print(table)
    n_run = sum(a == "run" for a in actions.values())
    console.print(f"{n_run} to run, {sum(a == 'hit' for a in actions.values())} cached, then the report"
                  f" (root {storage.uri})", highlight=False, markup=False)


@app.command()
def sync(root: RootOpt = DEFAULT_ROOT, tracking_uri: UriOpt = None) -> None:
    """Deliver the tracking events that runs on this root kept while their MLflow server was away, and mark the
    MLflow runs of drivers that died (SIGKILL, a lost node) KILLED. Runs still going are left alone."""
    from pipeline.storage import Storage
    from pipeline.tracking import sync_root

    result = _guard(lambda: sync_root(Storage(root), tracking_uri))
    Console().print(_synced(result), highlight=False, markup=False, soft_wrap=True)
    if result["unreachable"]:
        raise typer.Exit(1)


def _synced(r: dict) -> str:
    text = (f"{r['records']} ended run(s) synced: {r['replayed']} kept tracking event(s) delivered, "
            f"{r['killed']} MLflow run(s) of dead drivers marked KILLED")
    if r["rejected"]:
        text += f", {r['rejected']} event(s) refused by the store (kept in *.rejected beside their spool)"
    if r["live"]:
        text += f"; {r['live']} run(s) still going left alone"
    if r["unreachable"]:
        text += "; not answering: " + ", ".join(r["unreachable"])
    if r["other_stores"]:
        text += "; records of other stores (give --tracking-uri to sync them): " + ", ".join(r["other_stores"])
    return text


def summary_table(summary: dict) -> Table:
    """The AR vs NARVL table; every cell is literal text (ablation names such as `[ce]` are not rich markup)."""
    table = Table(title=Text(f"AR vs NARVL ({summary.get('profile')})"))
    for col in ("task", "metric", "AR", "NARVL", "AR ms", "NARVL ms", "speedup"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, row in summary.get("tasks", {}).items():
        ar, nar = row.get("ar") or {}, row.get("narvl") or {}
        _literal_row(table, task, str(ar.get("metric") or nar.get("metric") or "-"), _f(ar.get("value")),
                     _f(nar.get("value")), _f(ar.get("latency_ms")), _f(nar.get("latency_ms")),
                     _f(row.get("speedup"), suffix="x"))
    for task, rows in summary.get("ablations", {}).items():
        for name, r in rows.items():
            _literal_row(table, task, f"{r.get('metric') or '-'} [{name}]", "", _f(r.get("value")), "", "", "")
    return table


def gap_table(summary: dict) -> Table:
    """Per task: the image-blind baseline on the task's gap metric and the share of the gap to 100 each model
    closes, (score - blind) / (100 - blind)."""
    table = Table(title="gap closed over an image-blind baseline")
    for col in ("task", "gap metric", "blind", "AR", "NARVL", "AR closed", "NARVL closed"):
        table.add_column(col, justify="left" if col in ("task", "gap metric") else "right", overflow="fold")
    for task, row in summary.get("tasks", {}).items():
        ar, nar = (row.get("ar") or {}).get("gap") or {}, (row.get("narvl") or {}).get("gap") or {}
        blind = row.get("blind") or {}
        _literal_row(table, task, str(blind.get("metric") or "-"), _f(blind.get("value")), _f(ar.get("score")),
                     _f(nar.get("score")), _f(ar.get("gap_closed")), _f(nar.get("gap_closed")))
    return table


def _literal_row(table: Table, *cells: Any) -> None:
    """Add a row of plain text: names from configs, MLflow or files are printed as they are, never as markup."""
    table.add_row(*(Text(str(c)) for c in cells))


def _f(v: Any, suffix: str = "") -> str:
    return f"{v:.2f}{suffix}" if isinstance(v, int | float) and not isinstance(v, bool) else "-"


@app.command()
def gc(root: RootOpt = DEFAULT_ROOT,
       dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be removed, remove nothing")] = False,
       grace_hours: Annotated[float, typer.Option("--grace-hours", min=0.0,
                                                  help="keep folders changed more recently than this")] = 1.0,
       tracking_uri: UriOpt = None,
       ) -> None:
    """Remove abandoned scratch folders (.work-*, .tmp-*, .old-*) of dead runs: no live lease, idle for the grace
    period. A removed .work-* folder takes its checkpoints with it (that stage then trains from the start). Then,
    as `narvl sync` does, mark the MLflow runs of dead drivers KILLED (not with --dry-run)."""
    from pipeline.gc import collect, human_bytes
    from pipeline.storage import Storage
    from pipeline.tracking import sync_root

    storage = _guard(lambda: Storage(root))
    if not dry_run:
        Console().print(_synced(_guard(lambda: sync_root(storage, tracking_uri))), highlight=False, markup=False,
                        soft_wrap=True)
    found = _guard(lambda: collect(storage, grace_s=grace_hours * 3600, dry_run=dry_run))
    for item in found:
        action = "would remove" if dry_run and item.action == "remove" else item.action
        typer.echo(f"{action:>24}  {human_bytes(item.bytes):>9}  {item.files:>6} files  {item.rel}")
    gone = [i for i in found if i.action in ("remove", "removed")]
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(gone)} of {len(found)} scratch folders, {human_bytes(sum(i.bytes for i in gone))}"
               f" (root {storage.uri})")


# ---- config ----------------------------------------------------------------------------------------------
@config_app.command("show")
def config_show(profile: ProfileOpt = None, config: ConfigOpt = None, overrides: OverridesArg = None,
                tasks: TasksOpt = None) -> None:
    """Print the fully resolved pipeline config as YAML."""
    cfg = _guard(lambda: _load(profile, config, overrides, tasks))
    typer.echo(config_to_yaml(cfg), nl=False)


# ---- data ------------------------------------------------------------------------------------------------
class _ConsoleLog:
    """A StageLog printing to the console (for data commands outside the pipeline)."""

    def info(self, msg: str) -> None:
        typer.echo(msg)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        typer.echo(f"step {step}: {values}")

    def artifact(self, path: Path) -> None:
        pass

    def progress(self, step: int, total: int | None = None) -> None:
        pass


@data_app.command("synth")
def data_synth(out: Annotated[Path, typer.Option("--out", help="output folder")],
               profile: ProfileOpt = None, config: ConfigOpt = None, overrides: OverridesArg = None,
               tasks: TasksOpt = None) -> None:
    """Write the built-in benchmark as shards (<out>/<task>/<split>/), usable as data.source=shards."""
    cfg = _guard(lambda: _load(profile, config, overrides, tasks))
    from stages.prepare_data import synth_all

    _guard(lambda: _output_folder(out))
    report = _guard(lambda: synth_all(cfg.data, cfg.tasks, out, _ConsoleLog()))
    typer.echo(json.dumps(report, indent=2))


def _pairs(items: list[str] | None, option: str) -> dict[str, Path] | None:
    """["train=a.json", "val=b.json"] -> {"train": Path("a.json"), ...}."""
    if not items:
        return None
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r}: expected SPLIT=FILE, e.g. {option} train=path/file.json")
        split, file = item.split("=", 1)
        out[split] = Path(file)
    return out


class _FormatGroup(TyperGroup):
    """`narvl data convert FORMAT`: an unknown FORMAT names the formats (click would say "No such command")."""

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            raise typer.BadParameter(f"unknown format {args[0]!r}; one of {', '.join(self.commands)}", ctx=ctx,
                                     param_hint="FORMAT")
        return super().resolve_command(ctx, args)


convert_app = typer.Typer(cls=_FormatGroup, no_args_is_help=True, rich_markup_mode=None,
                          help="Convert a real dataset into shards (<out>/<task>/<split>/). "
                               "`narvl data convert FORMAT --help` lists that format's inputs.")
data_app.add_typer(convert_app, name="convert")

OutOpt = Annotated[Path, typer.Option("--out", help="output folder (<out>/<task>/<split>/ shards)")]
ImagesOpt = Annotated[Path, typer.Option("--images", help="image folder, searched recursively")]
SplitMapOpt = Annotated[list[str] | None, typer.Option(
    "--split-map", help="SOURCE=SPLIT, repeatable: the output split of a source split (default: the same name; "
                        "train2014/train2017/restval -> train, val2014/val2017/minival/dev -> val, ...)")]
PerShardOpt = Annotated[int, typer.Option("--samples-per-shard", min=1, help="samples per tar shard")]
OnBadOpt = Annotated[Literal["error", "skip"], typer.Option(
    "--on-bad", help="a bad record: error (stop, naming it) or skip (count it by reason)")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, help="processes validating records")]
ResumeOpt = Annotated[bool, typer.Option(help="keep splits that already have a manifest")]


def _convert(fmt: str, out: Path, inputs: dict[str, Any], split_map: list[str] | None, samples_per_shard: int,
             on_bad: str, workers: int, resume: bool) -> None:
    def go() -> dict:
        from stages.data.converters import convert

        # SPLIT=FILE lists (option --<name>) become {split: path}
        args = {k: _pairs(v, f"--{k}") if isinstance(v, list) else v for k, v in inputs.items() if v is not None}
        split_pairs = _pairs(split_map, "--split-map") or {}
        args.update(split_map={k: str(v) for k, v in split_pairs.items()} or None,
                    samples_per_shard=samples_per_shard, on_bad=on_bad, workers=workers, resume=resume)
        _output_folder(out)
        return convert(fmt, args, out)

    typer.echo(json.dumps(_guard(go), indent=2, default=str))


def _output_folder(out: Path) -> None:
    """Create `out` if needed and check that files can be written there; ConfigError naming it otherwise."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".narvl-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out} is not a writable folder: {e.strerror or e}") from None


@convert_app.command("coco-caption")
def _convert_coco_caption(
    out: OutOpt, images: ImagesOpt,
    captions: Annotated[list[str] | None, typer.Option(
        "--captions", help="SPLIT=captions_*.json (official COCO captions file), repeatable")] = None,
    karpathy: Annotated[Path | None, typer.Option(
        "--karpathy", help="Karpathy's dataset_coco.json instead of --captions (its splits: train, restval, val, "
                           "test)")] = None,
    split_map: SplitMapOpt = None, samples_per_shard: PerShardOpt = 1000, on_bad: OnBadOpt = "error",
    workers: WorkersOpt = 2, resume: ResumeOpt = True,
) -> None:
    """COCO captions -> caption shards, one sample per image with all its references.

    Give either --captions (the official files, one per split) or --karpathy. Images are found under --images by
    file name, else by the image id in the name.
    """
    _convert("coco-caption", out, {"images": images, "captions": captions,
                                   "karpathy": karpathy}, split_map, samples_per_shard, on_bad, workers, resume)


@convert_app.command("vqa")
def _convert_vqa(
    out: OutOpt, images: ImagesOpt,
    questions: Annotated[list[str], typer.Option(
        "--questions", help="SPLIT=v2_OpenEnded_mscoco_*_questions.json, repeatable")],
    annotations: Annotated[list[str], typer.Option(
        "--annotations", help="SPLIT=v2_mscoco_*_annotations.json, repeatable (the same splits as --questions)")],
    split_map: SplitMapOpt = None, samples_per_shard: PerShardOpt = 1000, on_bad: OnBadOpt = "error",
    workers: WorkersOpt = 2, resume: ResumeOpt = True,
) -> None:
    """VQA v2 (official questions + annotations) -> vqa shards, one sample per question with its 10 answers.

    Images under --images are named COCO_<subtype>_<id:012d>.jpg (2014) or <id:012d>.jpg (2017).
    """
    _convert("vqa", out, {"images": images, "questions": questions,
                          "annotations": annotations},
             split_map, samples_per_shard, on_bad, workers, resume)


@convert_app.command("refcoco")
def _convert_refcoco(
    out: OutOpt, images: ImagesOpt,
    jsonl: Annotated[list[str] | None, typer.Option(
        "--jsonl", help="SPLIT=FILE.jsonl, repeatable: one expression per line with file_name, bbox_xywh, "
                        "sentence, image_id, ann_id")] = None,
    refs: Annotated[Path | None, typer.Option(
        "--refs", help="the official refs(unc).p / refs(umd).p instead of --jsonl (needs --instances)")] = None,
    instances: Annotated[Path | None, typer.Option(
        "--instances", help="COCO instances.json: boxes by ann_id and image sizes (needed with --refs; with "
                            "--jsonl, image sizes are checked against it)")] = None,
    split_map: SplitMapOpt = None, samples_per_shard: PerShardOpt = 1000, on_bad: OnBadOpt = "error",
    workers: WorkersOpt = 2, resume: ResumeOpt = True,
) -> None:
    """RefCOCO / RefCOCO+ / RefCOCOg -> grounding shards, one sample per referring expression.

    COCO boxes (x, y, width, height) become x0, y0, x1, y1 pixels. The refs pickle is read without running code.
    """
    _convert("refcoco", out, {"images": images, "jsonl": jsonl, "refs": refs,
                              "instances": instances}, split_map, samples_per_shard, on_bad, workers, resume)


@convert_app.command("snli-ve")
def _convert_snli_ve(
    out: OutOpt, images: ImagesOpt,
    jsonl: Annotated[list[str], typer.Option(
        "--jsonl", help="SPLIT=snli_ve_*.jsonl, repeatable (Flickr30k_ID, sentence1, sentence2, gold_label)")],
    split_map: SplitMapOpt = None, samples_per_shard: PerShardOpt = 1000, on_bad: OnBadOpt = "error",
    workers: WorkersOpt = 2, resume: ResumeOpt = True,
) -> None:
    """SNLI-VE -> entailment shards, one sample per hypothesis.

    The premise is sentence1 (the caption); gold labels entailment / neutral / contradiction become yes / maybe /
    no. Flickr30k images under --images are named <flickr id>.jpg.
    """
    _convert("snli-ve", out, {"images": images, "jsonl": jsonl},
             split_map, samples_per_shard, on_bad, workers, resume)


@convert_app.command("ofa-tsv")
def _convert_ofa_tsv(
    out: OutOpt,
    task: Annotated[Literal["caption", "vqa", "grounding", "entailment"], typer.Option(
        "--task", help="the TSV layout (OFA's columns for that task)")],
    tsv: Annotated[list[str], typer.Option("--tsv", help="SPLIT=FILE.tsv, repeatable")],
    split_map: SplitMapOpt = None, samples_per_shard: PerShardOpt = 1000, on_bad: OnBadOpt = "error",
    workers: WorkersOpt = 2, resume: ResumeOpt = True,
) -> None:
    """OFA's TSV files (images inline as base64) -> <task> shards.

    The columns of a line (tab-separated, no header) per --task:
      caption:    uniq-id, image-id, references joined by &&, object labels, image
      vqa:        uniq-id, image-id, question, answers (confidence|!+answer joined by &&), object labels, image
      grounding:  uniq-id, image-id, text, box x0,y0,x1,y1 (pixels), image
      entailment: uniq-id, image-id, image, hypothesis, premise caption, label
    """
    _convert("ofa-tsv", out, {"task": task, "tsv": tsv},
             split_map, samples_per_shard, on_bad, workers, resume)


# ---- compare / sweep -------------------------------------------------------------------------------------
RunIdsArg = Annotated[list[str] | None, typer.Argument(help="parent run ids (default: the last N)")]


@app.command()
def compare(run_ids: RunIdsArg = None,
            root: RootOpt = DEFAULT_ROOT, tracking_uri: UriOpt = None,
            last: Annotated[int, typer.Option("--last", help="how many recent runs")] = 5) -> None:
    """Side-by-side table of pipeline runs from MLflow: per task AR / NARVL metric, latency, speedup."""
    Console(soft_wrap=True).print(_guard(lambda: compare_table(run_ids or [], root, tracking_uri, last)))


def compare_table(run_ids: list[str], root: str, tracking_uri: str | None, last: int = 5) -> Table:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.storage import Storage
    from pipeline.tracking import default_tracking_uri

    storage = Storage(root)
    if tracking_uri is None and not storage.remote and not (storage.local() / "mlflow.db").exists():
        raise ConfigError(f"no MLflow store at {storage.local() / 'mlflow.db'}; give --root or --tracking-uri")
    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri(storage))
    if run_ids:
        try:
            runs = [client.get_run(r) for r in run_ids]
        except MlflowException as e:
            raise ConfigError(f"run not found: {e.message}") from None
    else:
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, filter_string="tags.narvl_role = 'pipeline'",
                                  order_by=["attributes.start_time DESC"], max_results=last) if exps else []
    if not runs:
        raise ConfigError("no pipeline runs found in the MLflow store")
    table = Table(title="pipeline runs")
    table.add_column("")
    for r in runs:
        head = f"{r.info.run_id[:8]}\n{r.data.tags.get('profile', '?')} {r.info.status}"
        table.add_column(Text(head), justify="right")
    tasks = sorted({k.split(".")[0] for r in runs for k in r.data.metrics if k.endswith(".speedup")
                    or k.endswith(".value")})
    for task in tasks:
        names = [r.data.tags[f"metric_name.{task}"] for r in runs if f"metric_name.{task}" in r.data.tags]
        metric = names[0] if names else "metric"
        for label, key, suffix in ((f"{task} AR {metric}", f"{task}.ar.value", ""),
                                   (f"{task} NARVL {metric}", f"{task}.narvl.value", ""),
                                   (f"{task} AR ms", f"{task}.ar.latency_ms", ""),
                                   (f"{task} NARVL ms", f"{task}.narvl.latency_ms", ""),
                                   (f"{task} speedup", f"{task}.speedup", "x")):
            _literal_row(table, label, *(_f(r.data.metrics.get(key), suffix) for r in runs))
    return table


@app.command()
def tables(runs: Annotated[list[Path] | None, typer.Argument(help="run folders (<root>/runs/...)")] = None,
           root: RootOpt = DEFAULT_ROOT,
           last: Annotated[int, typer.Option("--last", help="without RUNS: the newest N run folders")] = 3,
           out: Annotated[Path | None, typer.Option("--out", help="also write the tables to this file")] = None,
           ) -> None:
    """Mean +- std over several runs (e.g. the seeds of a study): AR vs NARVL per task and the ablations."""
    from pipeline.study import aggregate, find_runs, load_summaries, render_tables

    def go() -> str:
        folders = find_runs(Path(root), runs or [], last)
        return render_tables(aggregate(load_summaries(folders)), folders)

    text = _guard(go)
    typer.echo(text, nl=False)
    if out is not None:
        out.write_text(text)


@app.command()
def sweep(config: Annotated[Path, typer.Option("--config", "-c", help="a sweep YAML (configs/sweeps/)")],
          overrides: OverridesArg = None, root: RootOpt = DEFAULT_ROOT, address: AddressOpt = None,
          tracking_uri: UriOpt = None) -> None:
    """Ray Tune sweep over train_nar's number of learnable queries (paper Table 10), on the cached prefix."""
    from pipeline.sweep import load_sweep_config, run_sweep

    def go() -> dict:
        scfg = load_sweep_config(config, overrides or [])
        return run_sweep(scfg, root, address=address, tracking_uri=tracking_uri)

    try:
        result = _guard(go)
    except typer.Exit:
        raise
    except RuntimeError as e:  # failed trials: the message lists them
        raise _err(str(e), code=1) from None
    table = Table(title=Text(f"query-length sweep ({result['dir']})"))
    cols = ["task", "num_queries", "metric", "value", "latency_ms", "ar_latency_ms", "speedup", "wall_s"]
    for c in cols:
        table.add_column(c)
    for row in result["rows"]:
        _literal_row(table, *[f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c)) for c in cols])
    Console(soft_wrap=True).print(table)
    print(f"sweep results: {result['dir']}")


# ---- submit to a cluster -----------------------------------------------------------------------------------
job_app = typer.Typer(no_args_is_help=True, help="Jobs submitted with `narvl submit`: status, logs, stop.")
app.add_typer(job_app, name="job")
JobAddressOpt = Annotated[str, typer.Option("--address", help="the cluster's job server, e.g. http://HEAD:8265 "
                                                             "(or RAY_API_SERVER_ADDRESS / RAY_ADDRESS)")]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(ctx: typer.Context, address: JobAddressOpt = "",
           wait: Annotated[bool, typer.Option("--wait", help="follow the job's logs until it ends")] = False) -> None:
    """Submit `narvl run` with the run options that follow to a Ray cluster as a job (the project as its working_dir).

    Everything after the options of `submit` is passed to `narvl run`, e.g.
    `narvl submit --address http://HEAD:8265 --profile smoke --root s3://bucket/narvl`.
    """
    from pipeline.submit import follow, submit_run

    job_id = _guard(lambda: submit_run(_job_address(address), list(ctx.args)))
    print(job_id)
    if wait:
        status = follow(_job_address(address), job_id)
        if status != "SUCCEEDED":
            raise _err(f"job {job_id} ended {status}", code=1)


@job_app.command("status")
def job_status(job_id: str, address: JobAddressOpt = "") -> None:
    """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from pipeline.submit import client

    print(_guard(lambda: client(_job_address(address)).get_job_status(job_id).value))


@job_app.command("logs")
def job_logs(job_id: str, address: JobAddressOpt = "",
             follow_: Annotated[bool, typer.Option("--follow", "-f", help="until the job ends")] = False) -> None:
    """The job's output (the driver's console: progress, the summary table)."""
    from pipeline.submit import client, follow

    if follow_:
        follow(_job_address(address), job_id)
    else:
        typer.echo(_guard(lambda: client(_job_address(address)).get_job_logs(job_id)), nl=False)


@job_app.command("stop")
def job_stop(job_id: str, address: JobAddressOpt = "") -> None:
    """Stop the job (its stages are cancelled; a resubmission reuses every finished stage)."""
    from pipeline.submit import client

    _guard(lambda: client(_job_address(address)).stop_job(job_id))
    print(f"stop requested: {job_id}")


def _job_address(address: str) -> str:
    import os

    found = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    if not found.startswith("http"):
        raise _err("give the cluster's job server: --address http://HEAD:8265")
    return found


@app.command()
def serve(model: Annotated[str, typer.Argument(help="a train_teacher/train_nar output (or its checkpoint/), or an "
                                               "MLflow model URI (runs:/<id>/model, models:/<name>/<version>)")],
          tokenizer: Annotated[Path | None, typer.Option(help="prepare_data's tokenizer/ folder")] = None,
          config: Annotated[Path | None, typer.Option("--config", "-c", help="a YAML of serve options")] = None,
          options: Annotated[list[str] | None, typer.Argument(help="serve options, e.g. max_batch_size=32 "
                                                               "num_gpus=1 ar_decode=greedy port=8080")] = None,
          address: AddressOpt = None) -> None:
    """Serve a trained model over HTTP on Ray Serve (POST /v1/<task>, GET /healthz), with dynamic batching."""
    import yaml
    from pydantic import ValidationError

    from pipeline.serving.app import ServeConfig, config_from_file, serve_forever

    try:
        fields: dict[str, Any] = config_from_file(config) if config else {}
        for item in options or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"option {item!r}: expected key=value (a ServeConfig field)")
            fields[key] = yaml.safe_load(value)
        cfg = ServeConfig(**{**fields, "model": model, **({"tokenizer": str(tokenizer)} if tokenizer else {})})
    except (ValidationError, ValueError, OSError) as e:
        raise _err(f"serve: {e}") from None
    serve_forever(cfg, ray_address=address)

