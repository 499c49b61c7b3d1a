"""``driftloop drift``: compare a window of data with the training reference, from the command line.

``compare`` reads two Parquet files (or a saved profile JSON as the reference), runs ``check_drift`` and
prints per-column verdicts, data quality and the dataset verdict as a table, or everything as JSON.
Its policy is the monitor's: the settings' (``DRIFTLOOP_DRIFT_*``), with the options below over it; the
option types are shared with ``driftloop monitor check``. Bad input ends with one ``error:`` line on
stderr and exit code 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # pandas, pyarrow and the engine load when a command runs: `driftloop --help` stays fast
    import pandas as pd

    from driftloop.settings import Settings
    from monitoring.drift import ColumnDrift, DriftPolicy, DriftReport, ReferenceProfile

drift_app = typer.Typer(help="Data drift: compare current data with the training reference.",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

out = Console()
err = Console(stderr=True)


def _fail(message: str) -> NoReturn:
    # Same shape as driftloop.cli.fail, kept local: importing driftloop.cli here would be circular.
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


# The drift policy's options, shared by `drift compare` and `monitor check`: unset, the settings decide.
DriftShare = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Dataset drift at this share of drifted columns "
    "(setting DRIFTLOOP_DRIFT_SHARE, default 0.3).")]
NumThreshold = Annotated[float | None, typer.Option(
    min=0.0, help="A numerical column drifts at this score (setting DRIFTLOOP_DRIFT_NUM_THRESHOLD, default 0.1).")]
CatThreshold = Annotated[float | None, typer.Option(
    min=0.0, help="A categorical column drifts at this score (setting DRIFTLOOP_DRIFT_CAT_THRESHOLD, default 0.1).")]
MinRows = Annotated[int | None, typer.Option(
    min=1, help="Fewer rows than this: insufficient_data (setting DRIFTLOOP_DRIFT_MIN_ROWS, default 200).")]
ClipQuantile = Annotated[float | None, typer.Option(
    min=0.0, max=0.499, help="Clip numerical samples to the reference's q and 1-q quantiles before the test; "
    "0: Evidently's exact formula (setting DRIFTLOOP_DRIFT_CLIP_QUANTILE, default 0.005).")]
Kinds = Annotated[list[str] | None, typer.Option(
    "--kind", help="COLUMN=numerical or COLUMN=categorical, over the inferred kind; repeatable "
    "(setting DRIFTLOOP_DRIFT_KINDS).")]


def drift_policy(settings: Settings, drift_share: float | None = None, num_threshold: float | None = None,
                 cat_threshold: float | None = None, min_rows: int | None = None,
                 clip_quantile: float | None = None, kinds: list[str] | None = None) -> DriftPolicy:
    """The settings' drift policy with the options given over it; bad values end with one ``error:`` line."""
    from monitoring.drift import DriftPolicy, parse_kinds

    try:
        forced = parse_kinds(kinds or [])
    except ValueError as error:
        _fail(f"--kind {error}")
    try:
        return DriftPolicy.from_settings(settings, drift_share=drift_share, num_threshold=num_threshold,
                                         cat_threshold=cat_threshold, min_rows=min_rows,
                                         clip_quantile=clip_quantile, kinds=forced)
    except ValueError as error:
        _fail(str(error))


def _settings() -> Settings:
    from driftloop.settings import SettingsError, load_settings

    try:
        return load_settings()
    except SettingsError as error:
        _fail(str(error))


@drift_app.callback()
def _drift() -> None:
    """Data drift: compare current data with the training reference."""


def _read_parquet(path: Path, role: str) -> pd.DataFrame:
    import pandas as pd
    import pyarrow as pa

    if not path.is_file():
        _fail(f"{role} file not found: {path}")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as error:  # pyarrow's ways of saying "not Parquet"
        _fail(f"{role} file {path} is not a readable Parquet file ({type(error).__name__}: {error})")


def _read_profile(path: Path) -> ReferenceProfile:
    from monitoring.drift import ReferenceProfile

    if not path.is_file():
        _fail(f"reference file not found: {path}")
    try:
        return ReferenceProfile.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        _fail(f"reference file {path}: {error}")


def _select(names: list[str], wanted: str | None, available: set[str]) -> list[str]:
    if wanted is None:
        return names
    chosen = [c.strip() for c in wanted.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in available]
    if unknown:
        _fail(f"--columns: {', '.join(unknown)} not in both files")
    if not chosen:
        _fail("--columns: give at least one column name")
    return chosen


@drift_app.command()
def compare(
    reference: Annotated[Path, typer.Argument(help="Reference data (Parquet) or a saved profile (.json).")],
    current: Annotated[Path, typer.Argument(help="Current data (Parquet).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print every score and verdict as JSON.")] = False,
    columns: Annotated[str | None, typer.Option(help="Comma-separated columns to test (default: shared features).")]
    = None,
    min_rows: MinRows = None,
    drift_share: DriftShare = None,
    num_threshold: NumThreshold = None,
    cat_threshold: CatThreshold = None,
    clip_quantile: ClipQuantile = None,
    kind: Kinds = None,
) -> None:
    """Compare CURRENT with REFERENCE: per-column drift, data quality and the dataset verdict."""
    from monitoring.drift import ReferenceProfile, build_profile, check_drift, feature_columns, parse_kinds

    policy = drift_policy(_settings(), drift_share, num_threshold, cat_threshold, min_rows, clip_quantile, kind)
    data = _read_parquet(current, "current")
    asked = parse_kinds(kind or [])
    if reference.suffix.lower() == ".json":
        profile = _read_profile(reference)
        shared = [c for c in profile.columns if c in data.columns]
        selected = _select(shared, columns, set(shared))
        if not selected:
            _fail(f"no columns in common between the profile {reference} and {current}")
        _known(asked, set(shared))
        fixed = [c for c, k in policy.kinds if c in selected and profile.columns[c].kind != k]
        if fixed:
            _fail(f"a saved profile's kinds are fixed: {', '.join(fixed)} would change; compare with the "
                  "reference data instead")
        profile = ReferenceProfile(profile.rows, {c: profile.columns[c] for c in selected}, profile.prediction)
    else:
        ref = _read_parquet(reference, "reference")
        shared_all = {c for c in ref.columns if c in data.columns}
        selected = _select(feature_columns(ref, data), columns, shared_all)
        if not selected:
            _fail(f"no columns in common between {reference} and {current}")
        if len(ref) == 0:
            _fail(f"reference file {reference} has no rows")
        _known(asked, shared_all)
        try:
            profile = build_profile(ref, selected, kinds=policy.kinds)
        except ValueError as error:
            _fail(str(error))
    report = check_drift(profile, data, policy)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report, reference, current)


def _known(kinds: dict[str, str], available: set[str]) -> None:
    unknown = [c for c in kinds if c not in available]
    if unknown:
        _fail(f"--kind: {', '.join(unknown)} not in both files")


def _score(c: ColumnDrift) -> str:
    if c.score is None:
        return "-"
    return f"{c.score:.3f} {'>=' if c.score >= c.threshold else '<'} {c.threshold:g}"


_STATUS = {"insufficient_data": "too few rows", "no_current_values": "no values",
           "no_reference_values": "no ref values"}


def _verdict(c: ColumnDrift) -> str:
    if c.drifted:
        return "[bold red]drift[/]"
    if c.status == "ok":
        return "[green]ok[/]"
    if c.status == "constant_reference":
        return "[green]ok[/] (constant)"
    return f"[yellow]{_STATUS.get(c.status, c.status)}[/]"


def _print_report(report: DriftReport, reference: Path, current: Path) -> None:
    from monitoring.drift import DRIFT, INSUFFICIENT_DATA

    title = f"{current.name} ({report.rows:,} rows) vs {reference.name} ({report.reference_rows:,} rows)"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    longest = max((len(n) for n in [*report.columns, "prediction"]), default=6)
    for name in ("column", "method", "score", "verdict", "quality"):
        table.add_column(name, justify="right" if name == "score" else "left", no_wrap=True,
                         min_width=longest if name == "column" else None)
    for name, c in report.columns.items():
        issues = report.quality[name].issues
        table.add_row(name, c.method, _score(c), _verdict(c), "[yellow]issues[/]" if issues else "ok")
    if report.prediction is not None:
        p = report.prediction
        table.add_row(p.column, p.method, _score(p), _verdict(p), "[dim]output[/]")
    out.print(table)
    colour = {DRIFT: "bold red", INSUFFICIENT_DATA: "yellow"}.get(report.verdict, "green")
    tested = sum(c.score is not None and c.status != INSUFFICIENT_DATA for c in report.columns.values())
    detail = (f"{len(report.drifted_columns)}/{tested} columns drifted, share {report.drift_share:.2f} "
              f"(drift at >= {report.policy.drift_share:g})")
    if report.verdict == INSUFFICIENT_DATA and report.rows < report.policy.min_rows:
        detail = f"fewer rows than --min-rows {report.policy.min_rows}"
    out.print(f"dataset: [{colour}]{report.verdict}[/]: {detail}", highlight=False)
    issues = report.quality_issues
    implausible = f", {report.implausible_rows:,} row(s) with implausible values" if report.implausible_rows else ""
    out.print(f"data quality: {'[yellow]' if issues else '[green]'}{len(issues)} column(s) with issues"
              f"{implausible}[/]" + (":" if issues else ""), highlight=False)
    for name, found in issues.items():
        out.print(f"  {name}: {'; '.join(found)}", highlight=False)
