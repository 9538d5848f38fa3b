"""Results of a mitigation-tuning study (protocol §10.3): its search trials from `analysis.load`, the Pareto
set and the recommended setting (both from validation metrics only), the confirmation of the chosen settings
on test with fresh seeds, and the trade-off figure (validation values).

Selection never reads a test metric: `search_trials` keeps only the validation columns of the search, and
`pareto_front`, `recommend` and `select` work on those. Test metrics enter only through `confirm_trials`,
the confirmation phase's trials, which are trained after the selection is fixed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import privacy, stats, style
from analysis.frames import load, study_meta
from spurious.metrics import PRIVACY_KEYS

SETTING_KEYS = ("l2", "noise_sigma", "dp_noise_multiplier", "dp_max_grad_norm", "lr")
# A setting's value of a key older studies (before DP) did not report: the training default.
SETTING_DEFAULTS = {"dp_noise_multiplier": 0.0, "dp_max_grad_norm": 1.0}
# A DP setting's privacy guarantee (spurious.metrics.PRIVACY_KEYS) is NaN without DP.
EPSILON = PRIVACY_KEYS[0]
# Seed means ± s.e. over seeds that selection reads (validation split) and that confirmation reports (test).
SELECTION_KEYS = ("val_spurious_score", "val_spurious_score_se", "val_acc", "val_acc_se")
TEST_VALUE_KEYS = ("spurious_score", "spurious_score_se", "test_acc", "test_acc_se")
SEARCH_COLUMNS = ("trial_id", *SETTING_KEYS, *SELECTION_KEYS, *PRIVACY_KEYS, "n_spurious", "epochs_done", "status")
CONFIRM_COLUMNS = ("trial_id", *SETTING_KEYS, "data_seed", "seeds", *TEST_VALUE_KEYS, *PRIVACY_KEYS, "n_spurious",
                   "epochs_done", "status")
SCORE, ACC = "val_spurious_score", "val_acc"


def _phase(df: pd.DataFrame, phase: str) -> pd.DataFrame:
    return df[df["phase"] == phase] if "phase" in df else df.iloc[0:0]


def _with_defaults(df: pd.DataFrame) -> pd.DataFrame:
    for key, value in SETTING_DEFAULTS.items():
        df[key] = df[key].fillna(value)
    return df


def search_trials(df: pd.DataFrame) -> pd.DataFrame:
    """Return the search trials of a tune-mitigation `load` frame, one row per setting: trial_id, setting
    (SETTING_KEYS), seed-averaged final VALIDATION metrics ± s.e. over seeds (NaN until reported; the test
    metrics the trials also report are left out: selection must not see them), the privacy guarantee of a DP
    setting (PRIVACY_KEYS, NaN without DP), n_spurious, epochs_done, status (a setting a scheduler stopped early
    is RUNNING: it never reported its last epoch)."""
    return _with_defaults(_phase(df, "search").reindex(columns=list(SEARCH_COLUMNS)).reset_index(drop=True))


def confirm_trials(df: pd.DataFrame) -> pd.DataFrame:
    """Return the confirmation trials of a tune-mitigation `load` frame, one row per confirmed setting: trial_id,
    setting, data_seed (the first fresh seed), seeds, seed-averaged final TEST metrics ± s.e., epochs_done,
    status."""
    return _with_defaults(_phase(df, "confirm").reindex(columns=list(CONFIRM_COLUMNS)).reset_index(drop=True))


def pareto_front(df: pd.DataFrame, minimize: str | tuple[str, ...] = SCORE, maximize: str = ACC) -> pd.DataFrame:
    """Return the rows no other row dominates (≤ on every `minimize` column and ≥ on `maximize`, strictly
    better on one), sorted by the first `minimize` column; by default on the validation score and validation
    accuracy, with `minimize=(SCORE, EPSILON)` also on ε (the third objective of a DP search)."""
    lower = [minimize] if isinstance(minimize, str) else list(minimize)
    values = np.column_stack([df[c].to_numpy(float) for c in lower] + [-df[maximize].to_numpy(float)])
    keep = [not np.any(np.all(values <= v, axis=1) & np.any(values < v, axis=1)) for v in values]
    return df[np.array(keep, dtype=bool)].sort_values(lower[0])


def recommend(df: pd.DataFrame, baseline_acc: float, max_acc_drop: float,
              baseline_score: float | None = None, max_epsilon: float = 0.0) -> dict | None:
    """Return the lowest-validation-score setting with validation accuracy ≥ `baseline_acc` (the baseline's
    validation accuracy) − D (ties: higher validation accuracy); None when no setting qualifies. With
    `baseline_score` (the baseline's validation score), a setting must also score strictly below it: a
    mitigation that removes nothing is not recommended over no mitigation. With `max_epsilon` > 0 a setting
    must also be DP with ε ≤ max_epsilon."""
    feasible = df[df[ACC] >= baseline_acc - max_acc_drop]
    if max_epsilon > 0:
        feasible = feasible[feasible[EPSILON] <= max_epsilon]
    if baseline_score is not None:
        feasible = feasible[feasible[SCORE] < baseline_score]
    if feasible.empty:
        return None
    best = feasible.sort_values([SCORE, ACC], ascending=[True, False]).iloc[0]
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in best.items()}


def select(root: str | Path, baseline: dict, max_acc_drop: float, epsilon_objective: bool = False,
           max_epsilon: float = 0.0) -> dict:
    """Return the selection of a study from its search trials' validation metrics (and ε): `trials`
    (search_trials), `finished` (TERMINATED), `front` (their Pareto set: on score and accuracy, and on ε with
    `epsilon_objective`) and `recommended` (or None; ε ≤ `max_epsilon` when that is > 0); `baseline` holds
    the baseline's validation metrics (SELECTION_KEYS)."""
    df = search_trials(load(root))
    finished = df[df["status"] == "TERMINATED"]
    minimize = (SCORE, EPSILON) if epsilon_objective else SCORE
    front = pareto_front(finished, minimize) if len(finished) else finished
    return {"trials": df, "finished": finished, "front": front,
            "recommended": recommend(finished, baseline[ACC], max_acc_drop, baseline[SCORE], max_epsilon)}


def _value(row: dict, key: str) -> float:
    value = row.get(key, SETTING_DEFAULTS.get(key))
    return float(SETTING_DEFAULTS[key] if value is None or (key in SETTING_DEFAULTS and pd.isna(value)) else value)


def _same(a: dict, b: dict) -> bool:
    return all(math.isclose(_value(a, k), _value(b, k), rel_tol=1e-9, abs_tol=0.0) for k in SETTING_KEYS)


def confirm_settings(selection: dict, base_lr: float, pareto: bool = False) -> list[dict]:
    """Return the settings to confirm, each {"roles": [...], **SETTING_KEYS}: the baseline (l2 = 0, σ = 0, no
    DP, `base_lr`), the recommended setting (if any) and with `pareto` every Pareto setting; a setting with two
    roles (the recommended one is on the Pareto front) is listed once."""
    out = [{"roles": ["baseline"], "l2": 0.0, "noise_sigma": 0.0, **SETTING_DEFAULTS, "lr": float(base_lr)}]
    chosen = [("recommended", selection["recommended"])] if selection["recommended"] else []
    if pareto:
        chosen += [("pareto", row) for row in selection["front"].to_dict(orient="records")]
    for role, row in chosen:
        setting = {k: _value(row, k) for k in SETTING_KEYS}
        match = next((s for s in out if _same(s, setting)), None)
        if match is None:
            out.append({"roles": [role], **setting})
        elif role not in match["roles"]:
            match["roles"].append(role)
    return out


def confirmation(df: pd.DataFrame, settings: list[dict]) -> list[dict]:
    """Return one record per confirmed setting: roles, setting, status, the test score and test accuracy
    (seed means ± s.e. over the fresh seeds, NaN until finished) and their differences from the confirmed
    baseline (`d_spurious_score`, `d_test_acc`, ± the s.e. √(se² + se_baseline²))."""
    trials = confirm_trials(df)
    records = []
    for setting in settings:
        rows = [r for r in trials.to_dict(orient="records") if _same(r, setting)]
        row = max(rows, key=lambda r: r["status"] == "TERMINATED", default={})  # a finished one first
        finished = row.get("status") == "TERMINATED"
        values = {k: (float(row[k]) if finished else math.nan) for k in TEST_VALUE_KEYS}
        privacy = {k: float(row.get(k, math.nan)) for k in (*PRIVACY_KEYS, "n_spurious")}
        records.append({**setting, "status": row.get("status", "PENDING"), **values, **privacy})
    base = records[0]
    for rec in records:
        for key in ("spurious_score", "test_acc"):
            rec[f"d_{key}"] = rec[key] - base[key]
            rec[f"d_{key}_se"] = math.hypot(rec[f"{key}_se"], base[f"{key}_se"]) if rec is not base else 0.0
    return records


def _pm(row: dict, key: str, digits: int, sign: str = "") -> str:
    """Return 'mean ± se' of `key` in `row` (`stats.cell`: the mean alone when the s.e. is NaN, as over one
    seed), `sign` '+' to sign the mean; never '-0.000'."""
    mean, se = float(row[key]), float(row[f"{key}_se"])
    mean = 0.0 if round(mean, digits) == 0 else mean
    text = stats.cell(mean, se, digits)
    return ("+" + text if sign == "+" and mean >= 0 else text) + ("" if not math.isnan(se) else " (one seed: no s.e.)")


def _seed_range(seeds: list[int]) -> str:
    """Return "data seed 3" or "data seeds 3–5"."""
    return f"data seed {seeds[0]}" if len(seeds) == 1 else f"data seeds {seeds[0]}–{seeds[-1]}"


def provenance(val_size: int, search_seeds: list[int], confirm_seeds: list[int]) -> str:
    """Return the sentence saying where the numbers come from."""
    return (f"selected on validation ({val_size} images held out of training), confirmed on test with "
            f"{_seed_range(confirm_seeds)} (the search used {_seed_range(search_seeds)}; training seed = data seed)")


def write_summary(root: str | Path, baseline: dict, max_acc_drop: float, objective: str, *, val_size: int,
                  search_seeds: list[int], confirm_seeds: list[int], settings: list[dict],
                  epsilon_objective: bool = False, max_epsilon: float = 0.0) -> dict:
    """Write tuning.json, pareto.csv and tradeoff.png into the experiment directory; return the summary.

    `baseline` is the search baseline's validation metrics; `settings` the confirmed settings
    (`confirm_settings`); `epsilon_objective` and `max_epsilon` as in `select`. The Pareto set and the
    recommendation hold validation values (accuracies and scores are fractions in [0, 1]) and a DP setting's ε;
    `confirmation` holds the test values of the confirmation phase."""
    root = Path(root)
    selection = select(root, baseline, max_acc_drop, epsilon_objective, max_epsilon)
    front = selection["front"]
    front.to_csv(root / "pareto.csv", index=False)
    summary = {"objective": objective, "max_acc_drop": max_acc_drop, "epsilon_objective": epsilon_objective,
               "max_epsilon": max_epsilon,
               "selection": {"split": "validation", "val_size": val_size, "search_data_seeds": search_seeds,
                             "confirm_data_seeds": confirm_seeds,
                             "note": provenance(val_size, search_seeds, confirm_seeds)},
               "baseline": baseline,
               "trials": int(len(selection["trials"])), "finished": int(len(selection["finished"])),
               "pareto": front.to_dict(orient="records"),
               "errored": errored(load(root)),
               "recommended": selection["recommended"],
               "confirmation": confirmation(load(root), settings)}
    (root / "tuning.json").write_text(json.dumps(summary, indent=2, default=float))
    style.save(tradeoff_figure(selection["finished"], front, baseline), root / "tradeoff.png")
    return summary


def tradeoff_figure(df: pd.DataFrame, front: pd.DataFrame, baseline: dict):
    """Return the scatter of validation spurious score vs validation accuracy per setting (colour = log10 l2,
    or log10 ε when the settings are DP; size = input-noise σ), with the Pareto front and the unmitigated
    baseline."""
    fig, (ax,) = style.grid(1, width=6.1, height=3.9)
    if len(df):
        private = EPSILON in df and df[EPSILON].notna().all()
        colour = np.log10(df[EPSILON] if private else df["l2"].clip(lower=1e-12))
        points = ax.scatter(df[ACC], df[SCORE], c=colour, s=30 + 120 * df["noise_sigma"], cmap="viridis",
                            alpha=0.8, edgecolors="k")
        fig.colorbar(points, ax=ax, label=("log10 ε of DP-SGD" if private else "log10 L2 weight")
                     + " (marker size: noise σ)")
        ax.plot(front[ACC], front[SCORE], "r--", lw=1, label="Pareto front")
    ax.scatter([baseline[ACC]], [baseline[SCORE]], marker="*", s=250, c="red",
               edgecolors="k", label="unmitigated baseline", zorder=5)
    ax.set_xlabel("validation clean accuracy (mean over seeds)")
    ax.set_ylabel("validation spurious score (mean over seeds)")
    ax.set_title("Mitigation trade-off (validation split)", fontsize=style.TITLE_SIZE)
    ax.legend(loc="best", fontsize=style.LEGEND_SIZE)
    ax.grid(alpha=0.3)
    return fig


def _setting(row: dict) -> str:
    dp = _value(row, "dp_noise_multiplier")
    private = f"  DP σ={dp:.3g} C={_value(row, 'dp_max_grad_norm'):.3g}" if dp > 0 else ""
    return f"l2={row['l2']:.3g}  σ={row['noise_sigma']:.3g}{private}  lr={row['lr']:.3g}"


def privacy_text(row: dict) -> str:
    """Return "  ε=… (δ=…), n planted: group ε=…, δ=…" for a DP row (group privacy for its k = n planted
    images, `spurious.dp.group_epsilon`; "vacuous" when the group δ reaches 1), "" without DP."""
    eps = float(row.get(EPSILON, math.nan) if row.get(EPSILON) is not None else math.nan)
    if math.isnan(eps):
        return ""
    text = f"  ε={eps:.3g} (δ={float(row['dp_delta_used']):.2g})"
    k = row.get("n_spurious")
    if k is not None and not pd.isna(k) and int(k) > 1:
        bound = privacy.group_text(int(k), float(row["dp_group_epsilon"]), float(row["dp_group_delta"]))
        text += f", {int(k)} planted: group ε={bound}"
    return text


def _fmt(row: dict) -> str:
    return (f"{_setting(row)}  val score={_pm(row, SCORE, 3)}  val acc={_pm(row, ACC, 4)}{privacy_text(row)}")


def _fmt_confirm(rec: dict) -> str:
    roles = "+".join(rec["roles"])
    if rec["status"] != "TERMINATED":
        return f"{roles:<21} {_setting(rec)}  {rec['status'].lower()}"
    diff = ("" if rec["roles"][0] == "baseline" else
            f"  vs baseline: score {_pm(rec, 'd_spurious_score', 3, '+')}, acc {_pm(rec, 'd_test_acc', 4, '+')}")
    return (f"{roles:<21} {_setting(rec)}  test score={_pm(rec, 'spurious_score', 3)}  "
            f"test acc={_pm(rec, 'test_acc', 4)}{diff}{privacy_text(rec)}")


def format_summary(summary: dict) -> str:
    """Return the provenance line, the baseline, the Pareto set and recommendation (validation values) and the
    confirmation table (test values over the fresh seeds) as text."""
    b, sel = summary["baseline"], summary["selection"]
    lines = [sel["note"] + ".",
             f"unmitigated baseline (l2=0, σ=0, no DP), validation: score={_pm(b, SCORE, 3)}  acc={_pm(b, ACC, 4)}"]
    axes = "score, accuracy and ε" if summary.get("epsilon_objective") else "score and accuracy"
    lines.append(f"Pareto set on validation {axes} ({len(summary['pareto'])} of {summary['finished']} finished "
                 f"settings):")
    lines += [f"  {_fmt(row)}" for row in summary["pareto"]]
    rec = summary["recommended"]
    rule = f"lowest validation score with validation accuracy >= baseline - {summary['max_acc_drop']}"
    if summary.get("max_epsilon"):
        rule += f" and ε <= {summary['max_epsilon']}"
    lines.append(f"recommended ({rule}): {_fmt(rec) if rec else 'none of the settings qualifies'}")
    seeds = sel["confirm_data_seeds"]
    lines.append(f"confirmed on test (mean ± s.e. over {len(seeds)} fresh seed{'s' if len(seeds) > 1 else ''}, "
                 f"{_seed_range(seeds)}):")
    lines += [f"  {_fmt_confirm(r)}" for r in summary["confirmation"]]
    bad = summary.get("errored") or []
    if bad:
        lines.append(f"ERRORED: {len(bad)} trial(s) failed; the sets above leave them out:")
        lines += [f"  {line}" for line in bad]
    return "\n".join(lines)


def errored(df: pd.DataFrame) -> list[str]:
    """Return "<phase> <trial_id>: <error>" for every errored trial of a tune-mitigation `load` frame."""
    if "status" not in df:
        return []
    bad = df[df["status"] == "ERROR"]
    return [f"{r.get('phase', '?')} {r.get('trial_id', '?')}: {r.get('error') or 'error'}"
            for r in bad.to_dict(orient="records")]


def write_report(root: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write a tuning study's report (summary.md, trials.csv, confirm.csv, pareto.csv, tradeoff.png,
    index.html); return its folder. trials.csv holds the search's validation values, confirm.csv the
    confirmation's test values."""
    import html
    import shutil

    from analysis.report import provenance_lines

    root = Path(root)
    summary = json.loads((root / "tuning.json").read_text()) if (root / "tuning.json").exists() else None
    if summary is None or "selection" not in summary:
        from spurious.errors import SpuriousError

        raise SpuriousError(f"{str(root)!r} has no tuning.json with a confirmation yet: finish it with "
                            f"`study resume {root}`")
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    df = load(root)
    search_trials(df).to_csv(out / "trials.csv", index=False)
    confirm_trials(df).to_csv(out / "confirm.csv", index=False)
    for name in ("pareto.csv", "tradeoff.png"):
        if (root / name).exists():
            shutil.copy(root / name, out / name)
    text = format_summary(summary)
    origin = "\n".join(provenance_lines(study_meta(root)))
    (out / "summary.md").write_text(f"# Mitigation tuning: {root.name}\n\nObjective: {summary['objective']}; "
                                    f"{summary['selection']['note']}.\n\n```\n{text}\n```\n\n"
                                    f"## Provenance\n\n```\n{origin}\n```\n")
    (out / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(root.name)}</title></head><body>"
        f"<h1>Mitigation tuning: {html.escape(root.name)}</h1><pre>{html.escape(text)}</pre>"
        f"<img src='tradeoff.png' alt='trade-off (validation)'><p><a href='trials.csv'>trials.csv</a> "
        f"(validation) · <a href='confirm.csv'>confirm.csv</a> (test) · "
        f"<a href='pareto.csv'>pareto.csv</a></p><h2>Provenance</h2><pre>{html.escape(origin)}</pre></body></html>")
    return out
