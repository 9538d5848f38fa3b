"""`write_report`: tidy frames, summary tables, figures and an index.html for one or more experiments.

Command: `study report results/demo-20261128-120000` writes results/demo-20261128-120000/report/:
trials.csv/.parquet, epochs.csv/.parquet, summary_<metric>.csv, claims.txt, summary.md, figures/*.png,
index.html; a detection study (`study detect`) adds detection.csv/.parquet, detection_controls.csv/.parquet
and figures/detection_auroc.png.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis import claims, figures, frames, privacy, stats, style
from spurious.errors import SpuriousError

SUMMARY_METRICS = ("spurious_score", "test_acc")
SIGNIFICANT = 0.05
WEIGHT_MAP_PANELS = 4
WEIGHT_MAP_FIGURES = 8
WEIGHT_MAP_GROUP = ("dataset", "model", "optimizer", "target", "pattern")


def write_report(experiment_dirs: str | Path | Iterable[str | Path],
                 out_dir: str | Path | None = None) -> Path:
    """Write the report of `experiment_dirs` into `out_dir` (default EXPERIMENT_DIR/report); return it."""
    single = isinstance(experiment_dirs, (str, Path))
    dirs = [Path(experiment_dirs)] if single else [Path(d) for d in experiment_dirs]
    if not dirs:
        raise SpuriousError("write_report needs at least one experiment directory")
    df = frames.load(dirs)
    if df.empty:
        raise SpuriousError(f"no trials (no */params.json) in {', '.join(map(str, dirs))}")
    out = Path(out_dir) if out_dir else dirs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_frame(df, out / "trials")
    write_frame(frames.load_epochs(dirs), out / "epochs")
    training = df[df["kind"] == "train"] if "kind" in df else df
    summaries = {m: frames.summarize(training, metric=m) for m in SUMMARY_METRICS} if not training.empty else {}
    for metric, summary in summaries.items():
        summary.to_csv(out / f"summary_{metric}.csv", index=False)
    studies = posthoc_sections(df) + privacy.sections(training)
    tables = [path.name for name, frame in posthoc_frames(df).items() for path in write_frame(frame, out / name)]
    found = {k: _display(v) for k, v in claims.claims(training, SIGNIFICANT).items()} if summaries else None
    if found is not None:
        (out / "claims.txt").write_text(claims.format_claims(found, SIGNIFICANT) + "\n")
    (out / "summary.md").write_text(summary_markdown(df, summaries, found)
                                    + "".join(f"\n## {title}\n\n```\n{table}\n```\n" for title, table, _ in studies)
                                    + "\n" + provenance_markdown(dirs))
    pngs = write_figures(training, out / "figures")
    pngs += [style.save(fig, out / "figures" / f"{name}.png") for _, _, made in studies for name, fig in made]
    (out / "index.html").write_text(index_html(dirs, df, summaries, [p.relative_to(out) for p in pngs], studies,
                                                  found, tables))
    return out


def provenance_lines(meta: dict) -> list[str]:
    """Return the short provenance of an experiment from its study.json (`study.provenance` records it): code
    version and commit, software, device, threads, command, dataset checksums (abbreviated), resumes."""
    record = meta.get("provenance")
    if not record:
        return ["none recorded (study.json predates provenance)"]
    lines = _provenance_lines(record)
    for again in meta.get("resumed", []):
        lines.append(f"resumed   {again.get('time')}: {_code(again)}; {again.get('command')}")
    return lines


def _provenance_lines(p: dict) -> list[str]:
    versions = ", ".join([f"Python {p.get('python')}",
                          *(f"{k} {v}" for k, v in (p.get("packages") or {}).items() if v)])
    device = (p.get("cpu") or "unknown CPU") + (f"; GPU {p['gpu']} (CUDA {p.get('cuda')})" if p.get("gpu") else "")
    threads = f"torch {p.get('torch_threads')} on the driver" + (
        f", {p['trial_threads']} per trial" if p.get("trial_threads") else "")
    data = "; ".join(f"{name}: {_checksums(d)}" for name, d in (p.get("datasets") or {}).items())
    return [f"code      {_code(p)}", f"software  {versions}", f"device    {device}", f"threads   {threads}",
            f"command   {p.get('command')}", f"datasets  {data or 'none'} (sha256)"]


def _checksums(dataset: dict | None) -> str:
    """Return "file sha256[:12], …" of one dataset's provenance entry."""
    return ", ".join(f"{f} {h[:12]}" for f, h in dataset["sha256"].items()) if dataset else "no local files"


def _code(p: dict) -> str:
    """Return "version, commit abc123… (dirty)" of a provenance record."""
    commit = p.get("git_commit")
    where = f"commit {commit[:12]}{' (dirty)' if p.get('git_dirty') else ''}" if commit else "not a git checkout"
    return f"version {p.get('version')}, {where}"


def provenance_markdown(dirs: Sequence[Path]) -> str:
    """Return the report's Provenance section: each experiment's `provenance_lines`."""
    blocks = ["\n".join(provenance_lines(frames.study_meta(d))) for d in dirs]
    return "## Provenance\n\n" + "".join(f"{d.name}:\n\n```\n{text}\n```\n\n" for d, text in zip(dirs, blocks))


def posthoc_sections(df: pd.DataFrame) -> list[tuple[str, str, list[tuple[str, object]]]]:
    """Return (title, plain-text table, [(figure name, figure)]) for the deletion, attack and detection trials in
    `df`: the deletion table and retrain figure (protocol §8.1), the attack table, MIA figure and ROC curves
    (protocol §9.4) and, for DP targets, the planted members' TPR against ε (protocol §10.5), the detection and
    control tables and the AUROC figure (`analysis.detection`)."""
    from analysis import detection, posthoc

    out = []
    kinds = set(df["kind"]) if "kind" in df else set()
    if "delete" in kinds:
        part = df[df["kind"] == "delete"]
        out.append(("Deletion: original, deleted and retrained (oracle) models", posthoc.deletion_table(part),
                    [("deletion_retrain", posthoc.retrain_figure(part))]))
    if "mia" in kinds:
        part = df[df["kind"] == "mia"]
        on_deleted = part["deletion_method"].notna() if "deletion_method" in part else pd.Series(False, part.index)
        if (~on_deleted).any():
            targets = part[~on_deleted]
            tables = [posthoc.mia_table(targets),
                      "The reference's layout (attack accuracy on all examples, rate of spurious members flagged; "
                      "thresholds calibrated on shadow models):\n" + posthoc.mia_reference_table(targets)]
            if any(c in targets for c in posthoc.VULNERABILITY):
                tables.append("Per-example vulnerability (online shadows, each the target in turn):\n"
                              + posthoc.vulnerability_table(targets))
                planted = posthoc.planted_vulnerability(targets)
                if not planted.empty:
                    tables.append("Each planted member (n ≤ 10): TPR across the online shadows that trained on it\n"
                                  + planted.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
            made = [("mia_attack_success", posthoc.mia_figure(targets)), ("mia_roc", posthoc.roc_figure(targets))]
            if posthoc.has_dp(targets):  # DP-SGD targets (protocol §10.5): their guarantee beside the planted TPR
                tables.append("The planted members against the targets' DP guarantee:\n"
                              + posthoc.mia_privacy_table(targets))
                made.append(("mia_privacy", posthoc.privacy_figure(targets)))
            out.append(("Membership inference", "\n\n".join(tables), made))
        if on_deleted.any():
            out.append(("Membership inference after deletion: forget set (planted examples) and other members",
                        posthoc.mia_deletion_table(part[on_deleted]), []))
    if "detect" in kinds:
        part = df[df["kind"] == "detect"]
        out.append(("Detection: finding the planted training examples without knowing the pattern",
                    detection.detection_text(part), [("detection_auroc", detection.detection_figure(part))]))
    return out


def posthoc_frames(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Return the post-hoc tables the report also writes as files, by file stem: for detection trials
    `detection` (`detection.detection_table`) and `detection_controls` (`detection.control_table`)."""
    from analysis import detection

    if "kind" not in df or not (df["kind"] == "detect").any():
        return {}
    part = df[df["kind"] == "detect"]
    return {"detection": detection.detection_table(part), "detection_controls": detection.control_table(part)}


def write_frame(df: pd.DataFrame, stem: Path) -> list[Path]:
    """Write `df` as `<stem>.csv` and `<stem>.parquet`; return both paths."""
    csv, parquet = stem.with_suffix(".csv"), stem.with_suffix(".parquet")
    df.to_csv(csv, index=False)
    _parquet_safe(df).to_parquet(parquet, index=False)
    return [csv, parquet]


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Return `df` with object columns of mixed Python types as strings (Parquet needs one type a column)."""
    out = df.copy()
    for column in out.columns[out.dtypes == object]:
        kinds = {type(v) for v in out[column].dropna()}
        if len(kinds) > 1:
            out[column] = out[column].map(lambda v: v if v is None or v is np.nan else str(v))
    return out


def _display(summary: pd.DataFrame) -> pd.DataFrame:
    """Return the summary with paper pattern labels (S1…Co) in the pattern column."""
    if "pattern" not in summary or summary.empty:
        return summary
    from spurious.patterns import short_name

    return summary.assign(pattern=summary["pattern"].map(short_name))


def markdown_table(table: pd.DataFrame, index: bool = True) -> str:
    """Return `table` as a GitHub-flavoured Markdown table."""
    flat = table.reset_index() if index else table
    header = [str(c) for c in flat.columns]
    rows = [[_md(v) for v in row] for row in flat.itertuples(index=False, name=None)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _md(value) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _counts(df: pd.DataFrame) -> str:
    counts = df["status"].value_counts().sort_index()
    return ", ".join(f"{n} {status.lower()}" for status, n in counts.items())


def marked_tables(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame, str]]:
    """Return (test name, pattern × n table, legend) per test of a summary: the replicate test, then the
    reference's per-example test when indicators were recorded (protocol §4.3, §4.4)."""
    shown = _display(summary)
    tests = [t for t in stats.TESTS if t == stats.REPLICATE_TEST or shown[f"p_{t}"].notna().any()]
    return [(frames.test_label(shown, t), frames.pivot_cells(shown, mark_p=SIGNIFICANT, test=t),
             frames.mark_legend(shown, SIGNIFICANT, t)) for t in tests]


def _models(df: pd.DataFrame) -> str:
    """Return ', from N trained models' when a training study's cells share models (protocol §7.3), else ''."""
    training = df[df["kind"] == "train"] if "kind" in df else df
    if "training_id" not in training or training.empty:
        return ""
    models = training["training_id"].nunique()
    return f"; {len(training)} training cells from {models} trained models" if models < len(training) else ""


def summary_markdown(df: pd.DataFrame, summaries: dict[str, pd.DataFrame],
                     found: dict[str, pd.DataFrame] | None = None) -> str:
    """Return the Markdown summary: per metric and test, a pattern × n table of mean ± s.e. with that test's
    marks and legend, the long table, and the Claims section (`claims.claims`)."""
    parts = [f"# Summary\n\nExperiments: {', '.join(sorted(df['experiment'].astype(str).unique()))}. "
             f"Rows: {len(df)} ({_counts(df)}){_models(df)}.\n\nCells are mean ± s.e. over seeds. Under each table: "
             "which "
             f"test its {frames.SIGNIFICANT_MARK} marks (p < {SIGNIFICANT} after Holm's adjustment over that "
             f"table's cells) and where {frames.SUPPRESSED_MARK} replaces a mark, and why (protocol §4.3).\n"]
    for metric, summary in summaries.items():
        parts.append(f"## {style.label(metric)} (`{metric}`)\n")
        if summary.empty:
            parts.append("No finished trials.\n")
            continue
        for name, table, legend in marked_tables(summary):
            parts.append(f"### {name}\n\n{markdown_table(table)}\n\n"
                         + "".join(f"{line}  \n" for line in _md_legend(legend)))
        parts.append(f"<details><summary>all cells</summary>\n\n{markdown_table(summary, index=False)}\n\n"
                     "</details>\n")
    if found is not None:
        parts.append(f"## Claims\n\n```\n{claims.format_claims(found, SIGNIFICANT)}\n```\n")
    errors = frames.errored(df)
    if errors:
        parts.append("## Errored trials\n\n" + "\n".join(f"- {e}" for e in errors) + "\n")
    return "\n".join(parts)


def _md_legend(legend: str) -> list[str]:
    """Return a legend's lines with Markdown's emphasis characters escaped."""
    return [line.replace("*", "\\*") for line in legend.splitlines()]


def weight_map_sets(df: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """Return (name, checkpoints) per dataset/model/optimizer/target/pattern of the training trials: the first
    seed's checkpoint at up to WEIGHT_MAP_PANELS values of n, without mitigation (the panels of protocol §4.5)."""
    if "checkpoint" not in df:
        return []
    done = frames.finished(df)
    done = done[done["checkpoint"].notna() & (done["kind"] == "train" if "kind" in done else True)]
    for knob in figures.MITIGATIONS:
        done = done[done[knob] == 0] if knob in done else done
    if done.empty:
        return []
    first = done.sort_values(["data_seed", "seed"]).groupby([*WEIGHT_MAP_GROUP, "n_spurious"]).head(1)
    sets = []
    for key, group in first.groupby(list(WEIGHT_MAP_GROUP), sort=True):
        group = group.sort_values("n_spurious")
        spread = np.linspace(0, len(group) - 1, min(len(group), WEIGHT_MAP_PANELS))
        picks = np.unique(spread.round().astype(int))
        sets.append(("_".join(map(str, key)), group["checkpoint"].iloc[picks].tolist()))
    return sets[:WEIGHT_MAP_FIGURES]


def write_figures(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write every figure the frame supports; return the PNG paths."""
    paths = [*figures.score_vs_n(df, out_dir), *figures.accuracy_vs_n(df, out_dir),
             *figures.mitigation_tradeoff(df, out_dir)]
    for name, checkpoints in weight_map_sets(df):
        try:
            paths.append(figures.weight_map(checkpoints, out_dir / f"weight_map_{_safe(name)}.png"))
        except SpuriousError:
            continue  # not an MLP, or an unreadable checkpoint: no weight map for this group
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def index_html(dirs: Sequence[Path], df: pd.DataFrame, summaries: dict[str, pd.DataFrame],
               pngs: Sequence[Path], studies: Sequence[tuple[str, str, list]] = (),
               found: dict[str, pd.DataFrame] | None = None, tables: Sequence[str] = ()) -> str:
    """Return a self-contained HTML page showing the summary tables, figures and links to the data files
    (`tables`: the names of further table files in the report folder)."""
    esc = html.escape
    body = [f"<h1>Report: {esc(', '.join(d.name for d in dirs))}</h1>",
            f"<p>{len(df)} rows ({esc(_counts(df))}{esc(_models(df))}) from {esc(', '.join(str(d) for d in dirs))}.</p>"]
    for metric, summary in summaries.items():
        body.append(f"<h2>{esc(style.label(metric))} <code>{esc(metric)}</code></h2>")
        if summary.empty:
            body.append("<p>No finished trials.</p>")
        for name, table, legend in [] if summary.empty else marked_tables(summary):
            body.append(f"<h3>{esc(name)}</h3>" + table.to_html(border=0)
                        + "<p class=note>mean ± s.e. over seeds<br>" + "<br>".join(map(esc, legend.splitlines()))
                        + "</p>")
    if found is not None:
        body.append(f"<h2>Claims</h2><pre>{esc(claims.format_claims(found, SIGNIFICANT))}</pre>")
    for title, table, _ in studies:
        body.append(f"<h2>{esc(title)}</h2><pre>{esc(table)}</pre>")
    errors = frames.errored(df)
    if errors:
        body.append("<h2>Errored trials</h2><ul>" + "".join(f"<li>{esc(e)}</li>" for e in errors) + "</ul>")
    body.append("<h2>Figures</h2>")
    body += [f'<figure><img src="{esc(p.as_posix())}" alt="{esc(p.stem)}"><figcaption>{esc(p.stem)}'
             f"</figcaption></figure>" for p in pngs]
    body.append("<h2>Provenance</h2>")
    for d in dirs:
        text = "\n".join(provenance_lines(frames.study_meta(d)))
        body.append(f"<h3>{esc(d.name)}</h3><pre>{esc(text)}</pre>")
    files = ["summary.md", *[f"summary_{m}.csv" for m in summaries], *(["claims.txt"] if found else []),
             "trials.csv", "trials.parquet", "epochs.csv", "epochs.parquet", *tables]
    body.append("<h2>Data</h2><ul>" + "".join(f'<li><a href="{f}">{f}</a></li>' for f in files) + "</ul>")
    css = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right}"
           "tr:nth-child(even){background:#f4f4f4}img{max-width:100%}figure{margin:1em 0}.note{color:#555}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{esc(dirs[0].name)} report</title>"
            f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
