"""Summaries, tables and figures of post-hoc studies: deletion (`study delete`, protocol §8) and membership
inference (`study mia`, protocol §9), from `analysis.load` frames.

    from analysis import load, posthoc
    df = load(["results/demo-delete-retrain", "results/demo-delete-group_influence"])
    print(posthoc.deletion_table(df))
    posthoc.retrain_figure(df).savefig("retrain.png")        # the paper's retrain figure
    mia = load("results/mia-train-mia-loss-lira")
    posthoc.mia_figure(mia).savefig("mia.png")               # spurious vs other members against n
    posthoc.roc_figure(mia).savefig("roc.png")               # ROC curves on log axes
    print(posthoc.mia_privacy_table(mia))                    # DP targets: planted TPR beside ε and its bound
    posthoc.privacy_figure(mia).savefig("privacy.png")       # planted TPR at 0.1 % / 1 % FPR against ε

`load` gives one row per post-hoc trial with its settings, its one final report (the source model's config
among it) and its status; `frames.join_source(df, load(source), on="source_trial_id")` (`target_trial_id`
for MIA) adds any other source column.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis import stats, style
from analysis.frames import finished

ROLES = ("before", "after", "oracle")
ROLE_LABELS = {"before": "original", "after": "deleted", "oracle": "retrained (oracle)"}
MIA_METRICS = ("attack_acc", "spurious_attack_acc", "other_attack_acc", "auc", "spurious_auc", "other_auc",
               "tpr_at_1pct_fpr", "spurious_tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "spurious_tpr_at_0_1pct_fpr",
               "attack_acc_oracle", "spurious_attack_acc_oracle", "nonmember_flag_rate")
# The attack table's columns: the calibrated accuracy first, its target-label oracle beside it (protocol §9.6).
MIA_TABLE = ("auc", "tpr_at_0_1pct_fpr", "attack_acc", "attack_acc_oracle", "spurious_attack_acc",
             "other_attack_acc", "spurious_auc", "spurious_tpr_at_0_1pct_fpr")
# After deletion: the forget set (the planted examples) and the other members, per model (protocol §9.8).
DELETION_ROLES = {"original": "original", "deleted": "deleted", "retrained": "retrained"}
FORGET_METRICS = {"spurious_auc": "forget AUC", "spurious_tpr_at_0_1pct_fpr": "forget TPR@0.1%",
                  "spurious_attack_acc": "forget flagged", "other_auc": "other members' AUC",
                  "other_tpr_at_0_1pct_fpr": "other members' TPR@0.1%"}
VULNERABILITY = {"planted_tpr_at_1pct_fpr": "planted TPR@1%", "other_examples_tpr_at_1pct_fpr": "others TPR@1%",
                 "planted_tpr_at_0_1pct_fpr": "planted TPR@0.1%",
                 "other_examples_tpr_at_0_1pct_fpr": "others TPR@0.1%"}
MIA_GROUPS = {"attack_acc": "all examples", "spurious_attack_acc": "spurious members",
              "other_attack_acc": "other members"}
# Settings of post-hoc trials (params.json keys) that make separate cells when a study varies them.
DELETE_SETTINGS = ("retrain_epochs", "lr_policy", "mode", "solver", "damping", "cg_tol", "cg_max_iter", "depth",
                   "scale", "repeats", "per_example", "lissa_batch_size", "lissa_seed", "max_norm_ratio",
                   "residual_batch")
MIA_SETTINGS = ("shadows", "online_shadows", "lira_variance", "fpr_rule", "rmia_gamma", "rmia_offline_a",
                "rmia_population")
FACTORS = ("dataset", "model", "pattern")
# DP-SGD settings of the trained models (protocol §10.5): a row of their own when the models differ in them.
DP_SETTINGS = ("dp_noise_multiplier", "dp_max_grad_norm", "dp_delta")
# The planted members' TPR at low FPR shown beside the targets' DP guarantee: column -> (FPR, label).
PRIVACY_TPRS = {"spurious_tpr_at_0_1pct_fpr": (0.001, "TPR@0.1%"), "spurious_tpr_at_1pct_fpr": (0.01, "TPR@1%"),
                "planted_tpr_at_0_1pct_fpr": (0.001, "online TPR@0.1%"),
                "planted_tpr_at_1pct_fpr": (0.01, "online TPR@1%")}


def _summary(df: pd.DataFrame, keys: Sequence[str], columns: dict[str, str], name: str) -> pd.DataFrame:
    """Return mean ± se per cell of `keys` for each column, long: keys, `name` (the column's label), stats."""
    parts = [stats.mean_se(df, keys, column).assign(**{name: label}) for column, label in columns.items()
             if column in df]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*keys, name, "mean", "se",
                                                                                  "count"])
    return out[[*keys, name, "mean", "se", "count"]]


def _table(done: pd.DataFrame, rows: Sequence[str], columns: dict[str, str]) -> str:
    """Return the plain-text table of 'mean ± se' cells: `rows` down, the labels of `columns` across."""
    summary = _summary(done, rows, columns, "column")
    summary["cell"] = [stats.cell(m, s) for m, s in zip(summary["mean"], summary["se"])]
    table = summary.pivot_table(index=rows, columns="column", values="cell", aggfunc="first")
    table.columns.name = None
    return table[[c for c in columns.values() if c in table]].to_string()


def _finished(df: pd.DataFrame, kind: str, settings: Sequence[str]) -> pd.DataFrame:
    """Return the finished rows of `kind` (all finished rows of a frame without kinds), settings as text."""
    done = finished(df)
    return _as_text(done[done["kind"] == kind] if "kind" in done else done, settings)


def _keys(df: pd.DataFrame, base: Sequence[str]) -> list[str]:
    return [k for k in base if k in df]


def _varying(df: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    return [k for k in keys if k in df and df[k].astype(str).nunique() > 1]


def _cells(df: pd.DataFrame, first: str, settings: Sequence[str], every_factor: bool) -> list[str]:
    """Return the keys of a cell: `first` (method or attack), the settings that vary among trials of one
    method or attack, the data factors (all, or only those that vary), the DP-SGD settings of the models
    when they vary, and n_spurious."""
    factors = _keys(df, FACTORS) if every_factor else _varying(df, FACTORS)
    varied = [k for k in settings if k in df and (df.groupby(first)[k].nunique(dropna=False) > 1).any()]
    return [first, *varied, *factors, *_varying(df, DP_SETTINGS), "n_spurious"]


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _as_text(df: pd.DataFrame, settings: Sequence[str]) -> pd.DataFrame:
    """Return `df` with the setting columns as text, so unset settings ('-', the default) are cells too."""
    return df.assign(**{k: [_text(v) for v in df[k]] for k in settings if k in df})


def deletion_summary(df: pd.DataFrame, metric: str = "spurious_score") -> pd.DataFrame:
    """Return mean ± se over seeds of `metric` for the original, deleted and oracle models, per method,
    varied setting, pattern and n_spurious (the paper's retrain figure, protocol §8.1)."""
    done = _finished(df, "delete", DELETE_SETTINGS)
    keys = _cells(done, "method", DELETE_SETTINGS, every_factor=True)
    return _summary(done, keys, {f"{metric}_{r}": r for r in ROLES}, "role")


def deletion_table(df: pd.DataFrame, metrics: Sequence[str] = ("spurious_score", "test_acc")) -> str:
    """Return a plain-text table: one row per method × varied setting × pattern × n, columns metric before /
    after / oracle (mean ± s.e. over seeds) and the parameter distance to the oracle before / after."""
    done = _finished(df, "delete", DELETE_SETTINGS)
    if done.empty:
        return "(no finished deletion trials)"
    rows = _cells(done, "method", DELETE_SETTINGS, every_factor=False)
    columns = {f"{m}_{r}": f"{m} {r}" for m in metrics for r in ROLES}
    columns.update({f"distance_to_oracle_{r}": f"distance {r}" for r in ("before", "after")})
    if "ihvp_residual" in done and done["ihvp_residual"].notna().any():
        columns["ihvp_residual"] = "inverse-HVP residual"  # group influence only (protocol §8.3)
    return _table(done, rows, columns)


def mia_summary(df: pd.DataFrame, metrics: Sequence[str] = MIA_METRICS) -> pd.DataFrame:
    """Return mean ± se over targets (data seeds) of the attack metrics, per attack, varied setting and
    n_spurious (protocol §9.4)."""
    done = _finished(df, "mia", MIA_SETTINGS)
    keys = _cells(done, "attack", MIA_SETTINGS, every_factor=True)
    return _summary(done, keys, {m: m for m in metrics}, "metric")


def _attack_trials(df: pd.DataFrame, deletion: bool) -> pd.DataFrame:
    """Return the finished attack trials on targets (deletion False) or on deleted models (True)."""
    done = _finished(df, "mia", MIA_SETTINGS)
    if done.empty:
        return done
    on_deleted = done["deletion_method"].notna() if "deletion_method" in done else pd.Series(False, done.index)
    return done[on_deleted == deletion]


def mia_table(df: pd.DataFrame, metrics: Sequence[str] = MIA_TABLE) -> str:
    """Return a plain-text table: rows attack × varied setting × n_spurious, columns the attack metrics
    (mean ± s.e. over targets); `attack_acc` is at the shadow-calibrated threshold, `attack_acc_oracle` at
    the target-label optimum (protocol §9.6)."""
    done = _attack_trials(df, deletion=False)
    if done.empty:
        return "(no finished attack trials)"
    rows = _cells(done, "attack", MIA_SETTINGS, every_factor=False)
    return _caption(done) + _table(done, rows, {m: m for m in metrics if m in done})


def _caption(done: pd.DataFrame) -> str:
    """Return the lines that say what an attack table's cells are (protocol §9.4, §9.6)."""
    counts = done.groupby([k for k in ("attack", *_varying(done, DP_SETTINGS), "n_spurious") if k in done]).size()
    seeds = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}–{counts.max()}"
    return textwrap.fill(f"Cells: mean ± s.e. over {seeds} target model(s) (data seeds) per row; no s.e. with one. "
            "auc: AUROC; tpr_at_X_fpr: TPR at FPR below X. attack_acc: accuracy over all members and "
            "non-members at the threshold calibrated on a shadow model (chance 0.5); *_oracle: at the threshold "
            "best on the target's own labels (no attacker has it). spurious_/other_attack_acc: fraction of the "
            "spurious / other members flagged at the calibrated threshold. spurious_*/forget: the planted "
            "examples against all non-members.", 110) + "\n"


def mia_reference_table(df: pd.DataFrame) -> str:
    """Return the reference's membership table (its notebook's layout, protocol §9.4): per attack and n, the
    attack accuracy on all examples and the rate at which the spurious members are flagged, mean ± s.e.
    over data seeds, both at the shadow-calibrated threshold."""
    done = _attack_trials(df, deletion=False)
    if done.empty:
        return "(no finished attack trials)"
    rows = _cells(done, "attack", MIA_SETTINGS, every_factor=False)
    return _table(done, rows, {"attack_acc": "all: attack accuracy", "spurious_attack_acc": "spurious: flagged"})


def mia_deletion_table(df: pd.DataFrame, metrics: dict[str, str] = FORGET_METRICS) -> str:
    """Return the attacks on deleted models: rows attack × deletion method × n, columns each forget-set metric
    for the original, deleted and retrained (oracle) models side by side (mean ± s.e. over seeds; protocol §9.8)."""
    done = _attack_trials(df, deletion=True)
    if done.empty:
        return "(no finished attacks on deleted models)"
    rows = ["attack", "deletion_method", *_cells(done, "attack", MIA_SETTINGS, every_factor=False)[1:]]
    blocks = []
    for metric, label in metrics.items():
        columns = {f"{role}_{metric}": role for role in DELETION_ROLES if f"{role}_{metric}" in done}
        if columns:
            blocks.append(f"{label}:\n" + _table(done, rows, columns))
    return (_caption(done) + textwrap.fill("Models: original (before deletion), deleted, retrained (from scratch "
                                           "without the forget set: the oracle). forget flagged: fraction of the "
                                           "forget set flagged at the calibrated threshold.", 110)
            + "\n\n" + "\n\n".join(blocks))


def vulnerability_table(df: pd.DataFrame) -> str:
    """Return per-example vulnerability (online attacks, protocol §9.7): rows attack × n, columns the mean TPR
    at 1 % and 0.1 % FPR of the planted members and of the other examples across the online shadows."""
    done = _attack_trials(df, deletion=False)
    if done.empty or not any(c in done for c in VULNERABILITY):
        return "(no online attack trials)"
    done = done[done["planted_tpr_at_1pct_fpr"].notna() | done["other_examples_tpr_at_1pct_fpr"].notna()]
    rows = _cells(done, "attack", MIA_SETTINGS, every_factor=False)
    return _table(done, rows, VULNERABILITY)


def planted_vulnerability(df: pd.DataFrame, max_n: int = 10) -> pd.DataFrame:
    """Return one row per planted member of each online attack trial with n ≤ `max_n`: attack, n_spurious,
    data_seed, its pool row, the number of online shadows that trained on it (`n_in`) and its TPR at 1 % and
    0.1 % FPR across them (protocol §9.7), read from the trials' checkpoints."""
    from spurious import checkpoint as checkpoints

    done = _attack_trials(df, deletion=False)
    columns = ["attack", "n_spurious", "data_seed", "pool_row", "n_in", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"]
    if done.empty or "planted_tpr_at_1pct_fpr" not in done:
        return pd.DataFrame(columns=columns)
    rows = []
    chosen = done[done["planted_tpr_at_1pct_fpr"].notna() & (pd.to_numeric(done["n_spurious"]) <= max_n)]
    for trial in chosen.sort_values(["attack", "n_spurious", "data_seed"]).itertuples():
        state = checkpoints.read_member(trial.checkpoint, 0)
        for r in np.flatnonzero(state["planted"].numpy()):
            rows.append([trial.attack, int(trial.n_spurious), int(trial.data_seed), int(r),
                         int(state["vulnerability_n_in"][r]), float(state["vulnerability_tpr_at_1pct_fpr"][r]),
                         float(state["vulnerability_tpr_at_0_1pct_fpr"][r])])
    return pd.DataFrame(rows, columns=columns)


def has_dp(df: pd.DataFrame) -> bool:
    """Return whether any row of `df` is of a model trained with DP-SGD (dp_noise_multiplier > 0)."""
    return "dp_noise_multiplier" in df and bool((pd.to_numeric(df["dp_noise_multiplier"], errors="coerce") > 0).any())


def _privacy_keys(done: pd.DataFrame) -> list[str]:
    """Return the cells of the privacy summary: the attack table's, with dp_noise_multiplier always."""
    keys = _cells(done, "attack", MIA_SETTINGS, every_factor=False)
    return keys if "dp_noise_multiplier" in keys else [*keys[:-1], "dp_noise_multiplier", keys[-1]]


def _mean(part: pd.DataFrame, column: str) -> float:
    return float(pd.to_numeric(part[column], errors="coerce").mean()) if column in part else math.nan


def privacy_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Return one row per attack × varied setting × DP setting × n of the attacks on targets, when any target was
    trained with DP-SGD (else an empty frame): the cell keys; `epsilon`, `delta` (the targets' final ε at δ,
    `dp_epsilon` at `dp_delta_used`; ε = inf and δ NaN for targets without DP), `group_epsilon`, `group_delta`
    (the bound for the n planted images together, `dp_group_epsilon`, `dp_group_delta`); `targets` (their
    count); and for each column of PRIVACY_TPRS that was measured: its mean, `<column>_se` (over targets) and
    `<column>_bound`, `<column>_group_bound`: the highest TPR any membership test can reach at that FPR under
    (ε, δ) and under the group's (kε, δ_k) (`spurious.mia.dp_tpr_bound`, protocol §10.5)."""
    from spurious.mia import dp_tpr_bound

    done = _attack_trials(df, deletion=False)
    if done.empty or not has_dp(done):
        return pd.DataFrame()
    keys = _privacy_keys(done)
    measured = [c for c in PRIVACY_TPRS if c in done and done[c].notna().any()]
    rows = []
    for key, part in done.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        private = float(row["dp_noise_multiplier"]) > 0
        row.update(epsilon=_mean(part, "dp_epsilon") if private else math.inf,
                   delta=_mean(part, "dp_delta_used") if private else math.nan,
                   group_epsilon=_mean(part, "dp_group_epsilon") if private else math.inf,
                   group_delta=_mean(part, "dp_group_delta") if private else math.nan, targets=len(part))
        for column in measured:
            values = pd.to_numeric(part[column], errors="coerce").dropna()
            fpr = PRIVACY_TPRS[column][0]
            row.update({column: values.mean() if len(values) else math.nan,
                        f"{column}_se": values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan,
                        f"{column}_bound": dp_tpr_bound(row["epsilon"], row["delta"], fpr),
                        f"{column}_group_bound": dp_tpr_bound(row["group_epsilon"], row["group_delta"], fpr)})
        rows.append(row)
    return pd.DataFrame(rows)


def _epsilon_text(eps: float, delta: float) -> str:
    if math.isinf(eps):
        return "∞ (no DP)"
    return "-" if math.isnan(eps) else f"{eps:.3g} at δ {delta:.2g}"


def _group_text(eps: float, delta: float) -> str:
    if math.isinf(eps):
        return "∞ (no DP)"
    if math.isnan(eps):
        return "-"
    return f"{eps:.3g}, δ_k {delta:.2g}" + (" (vacuous)" if delta >= 1 else "")


def _bound_text(one: float, group: float) -> str:
    return "-" if math.isnan(one) else f"{one:.3g} / {group:.3g}"


def mia_privacy_table(df: pd.DataFrame) -> str:
    """Return a plain-text table of the attacks on DP targets (protocol §10.5): rows attack × varied setting ×
    DP setting × n (non-DP targets: ε = ∞), columns the targets' ε at δ, the planted group's bound (kε, δ_k) and,
    per FPR, the planted members' measured TPR (mean ± s.e. over targets) beside the highest TPR (ε, δ)-DP
    allows one example and the group (`privacy_summary`)."""
    summary = privacy_summary(df)
    if summary.empty:
        return "(no attack trials on DP targets)"
    keys = [k for k in summary.columns if k in _privacy_keys(_attack_trials(df, deletion=False))]
    out = summary[keys].copy()
    out["ε"] = [_epsilon_text(e, d) for e, d in zip(summary["epsilon"], summary["delta"])]
    out["planted group: kε, δ_k"] = [_group_text(e, d) for e, d in zip(summary["group_epsilon"],
                                                                       summary["group_delta"])]
    for column, (_, label) in PRIVACY_TPRS.items():
        if column in summary:
            out[label] = [stats.cell(m, s) if not math.isnan(m) else "-"
                          for m, s in zip(summary[column], summary[f"{column}_se"])]
            out[f"{label} bound"] = [_bound_text(a, b) for a, b in zip(summary[f"{column}_bound"],
                                                                       summary[f"{column}_group_bound"])]
    caption = textwrap.fill(
        "ε: the target's final ε at δ (dp_epsilon at dp_delta_used; ∞: trained without DP). Planted group: the "
        "bound for its k = n planted images together, kε and δ_k = k·e^{(k−1)ε}·δ, capped at 1 (vacuous: δ_k = 1 "
        "bounds nothing). TPR@x: the planted members against all non-members at FPR below x, mean ± s.e. over "
        "targets; online: their per-example TPR across the online shadows (protocol §9.7). Bound: the highest "
        "TPR any membership test reaches at FPR x under (ε, δ)-DP, min(1, e^ε·x + δ, 1 − e^−ε·(1 − δ − x)) "
        "(Kairouz, Oh & Viswanath 2015, Thm 2.1), for one example / for the planted group at (kε, δ_k). The "
        "measured FPR is over other (clean) images, not over the same images left out, so the comparison is "
        "indicative. With k planted members a measured TPR moves in steps of 1/k (0.1 at k = 10): a bound below "
        "1/k cannot be told apart from 0 by this measurement.", 110)
    return caption + "\n" + out.to_string(index=False)


def privacy_figure(df: pd.DataFrame, columns: Sequence[str] = ("spurious_tpr_at_0_1pct_fpr",
                                                                "spurious_tpr_at_1pct_fpr")):
    """Return the planted members' TPR at low FPR against the targets' ε, one panel per attack (and varied
    setting) and FPR, one line per n (mean ± s.e. over targets), ε evenly spaced in increasing order with
    targets without DP at ε = ∞ ("no DP"); short bars beside each point: the highest TPR the planted group's
    (kε, δ_k) allows (in the n's colour) and one example's (ε, δ) (grey) (`privacy_summary`)."""
    summary = privacy_summary(df)
    columns = [c for c in columns if c in summary]
    if summary.empty or not columns:
        fig, _ = style.grid(1)
        return fig
    within = [*DP_SETTINGS, "n_spurious"]
    keys = [k for k in summary.columns if k in _privacy_keys(_attack_trials(df, deletion=False)) and k not in within]
    panels = [(values if isinstance(values, tuple) else (values,), part, column)
              for values, part in summary.groupby(keys, sort=True) for column in columns]
    fig, axes = style.grid(len(panels), width=4.2, height=3.4)
    for ax, (values, part, column) in zip(axes, panels):
        levels = sorted(set(part["epsilon"].round(6)))
        pos = {e: i for i, e in enumerate(levels)}
        for n, line in part.groupby("n_spurious", sort=True):
            line = line.sort_values("epsilon")
            x = [pos[e] for e in line["epsilon"].round(6)]
            drawn = ax.errorbar(x, line[column], yerr=line[f"{column}_se"].fillna(0).to_numpy(), marker="o",
                                capsize=3, label=f"n={n}")
            ax.plot(np.asarray(x) + 0.06, line[f"{column}_group_bound"], ls="none", marker="_", markersize=12,
                    color=drawn[0].get_color())
        one = part.groupby(part["epsilon"].round(6))[f"{column}_bound"].first()
        ax.plot(np.asarray([pos[e] for e in one.index]) - 0.06, one.to_numpy(), ls="none", marker="_",
                markersize=12, color="grey", label="bound, one example")
        ax.set_xticks(list(pos.values()), ["no DP" if math.isinf(e) else f"{e:.3g}" for e in pos])
        ax.set_xlabel("ε of the target (δ as reported)")
        ax.set_xlim(-0.5, len(levels) - 0.5)
        ax.set_ylim(-0.02, 1.02)
        title = " · ".join(str(v) if k == "attack" else f"{k}={v}" for k, v in zip(keys, values) if v != "-")
        ax.set_title(f"{title} · {PRIVACY_TPRS[column][1]}", fontsize=style.TITLE_SIZE)
    axes[0].set_ylabel("planted members' TPR (bars: bounds)")
    axes[0].legend(fontsize=style.LEGEND_SIZE)
    return fig


def _panels(summary: pd.DataFrame, within: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    """Return (title, rows) per panel: one panel per combination of the summary's keys not `within` a panel
    (method or attack, varied settings, pattern); set settings are titled key=value."""
    keys = [k for k in summary.columns if k not in (*within, "mean", "se", "count")]
    if summary.empty or not keys:
        return []
    out = []
    for values, part in summary.groupby(keys, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        out.append((" · ".join(str(v) if k in ("method", "attack", "pattern") else f"{k}={v}"
                               for k, v in zip(keys, values) if v != "-"), part))
    return out


def retrain_figure(df: pd.DataFrame, metric: str = "spurious_score"):
    """Return the retrain figure: `metric` against n for the original, deleted and retrained models, one
    panel per method (and pattern), mean ± s.e. over seeds (protocol §8.1)."""
    summary = deletion_summary(df, metric)
    panels = _panels(summary, ("dataset", "model", "n_spurious", "role"))
    fig, axes = style.grid(len(panels), width=4.2, height=3.4)
    for ax, (title, part) in zip(axes, panels):
        for role in ROLES:
            line = part[part["role"] == role].sort_values("n_spurious")
            ax.errorbar(line["n_spurious"], line["mean"], yerr=line["se"].fillna(0).to_numpy(), marker="o",
                        capsize=3, label=ROLE_LABELS[role])
        style.n_axis(ax, part["n_spurious"])
        ax.set_title(title, fontsize=style.TITLE_SIZE)
    axes[0].set_ylabel(style.label(metric))
    if panels:
        axes[0].legend(fontsize=style.LEGEND_SIZE)
    return fig


def mia_figure(df: pd.DataFrame, groups: dict[str, str] = MIA_GROUPS):
    """Return the MIA figure: attack success on all examples, spurious members and other members against
    n_spurious, one panel per attack, bars of mean ± s.e. over targets (protocol §9.4, the reference's bbox
    bars; the counts evenly spaced, as bars need)."""
    summary = mia_summary(df, tuple(groups))
    panels = _panels(summary, ("dataset", "model", "pattern", "n_spurious", "metric"))
    fig, axes = style.grid(len(panels), width=4.5, height=3.4)
    width = 0.8 / len(groups)
    for ax, (title, part) in zip(axes, panels):
        pos = {n: i for i, n in enumerate(sorted(set(part["n_spurious"])))}
        for k, (metric, label) in enumerate(groups.items()):
            bars = part[part["metric"] == metric].sort_values("n_spurious")
            ax.bar([pos[n] + (k - (len(groups) - 1) / 2) * width for n in bars["n_spurious"]], bars["mean"],
                   width, yerr=bars["se"].fillna(0).to_numpy(), capsize=2, label=label)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(list(pos.values()), [str(n) for n in pos])
        ax.set_xlabel(style.label("n_spurious"))
        ax.set_title(f"{title} attack", fontsize=style.TITLE_SIZE)
    axes[0].set_ylabel("attack accuracy / TPR at its threshold")
    if panels:
        axes[0].legend(fontsize=style.LEGEND_SIZE)
    return fig


def scores(checkpoint: str | Path, role: str = "") -> dict[str, np.ndarray]:
    """Return the per-example scores an attack trial saved in its checkpoint directory: member, nonmember
    (examples with a score only), spurious mask over the members, threshold; `role` (`original`, `deleted`,
    `oracle`) picks a model of an attack on deleted models."""
    from spurious import checkpoint as checkpoints

    state = checkpoints.read_member(checkpoint, 0)
    prefix = f"{role}_" if role else ""
    values, first = state[f"{prefix}scores"].numpy(), int(state["first"])
    planted = state["planted"].numpy().astype(bool)
    keep = np.isfinite(values)
    return {"member": values[:first][keep[:first]], "nonmember": values[first:][keep[first:]],
            "spurious": planted[:first][keep[:first]], "threshold": float(state[f"{prefix}threshold"])}


def roc_points(saved: dict[str, np.ndarray], group: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Return (fpr, tpr) of the members (`all`, `spurious` or `other`) against all non-members."""
    from spurious import mia

    members = {"all": saved["member"], "spurious": saved["member"][saved["spurious"]],
               "other": saved["member"][~saved["spurious"]]}[group]
    labels = np.r_[np.ones(len(members), bool), np.zeros(len(saved["nonmember"]), bool)]
    fpr, tpr, _ = mia.roc_curve(np.r_[members, saved["nonmember"]], labels)
    return fpr, tpr


def roc_on_grid(saved: dict[str, np.ndarray], group: str, grid: np.ndarray) -> np.ndarray:
    """Return the ROC curve's TPR at each FPR of `grid`: the highest TPR of a threshold whose FPR is at most
    the grid value (the step function of `roc_points`)."""
    fpr, tpr = roc_points(saved, group)
    best = np.maximum.accumulate(tpr)
    return best[np.searchsorted(fpr, grid, side="right") - 1]


ROC_GRID = np.logspace(-4, 0, 200)


def roc_figure(df: pd.DataFrame, groups: Sequence[str] = ("all", "spurious")):
    """Return ROC curves on log-log axes (Carlini et al. 2022), one panel per attack, one colour per n: the
    TPR at each FPR averaged over the targets (data seeds) of that n, solid for all members and dashed for
    the spurious members."""
    done = _attack_trials(df, deletion=False)
    done = done[done["checkpoint"].notna()] if "checkpoint" in done else done
    attacks = sorted(done["attack"].unique()) if not done.empty else []
    fig, axes = style.grid(len(attacks), width=4.5, height=4)
    for ax, attack in zip(axes, attacks):
        trials = done[done["attack"] == attack]
        for n, part in trials.groupby("n_spurious", sort=True):
            saved = [scores(c) for c in part["checkpoint"]]
            color = None
            for group, dashes in zip(groups, ("-", "--", ":")):
                curves = [roc_on_grid(v, group, ROC_GRID) for v in saved
                          if group != "spurious" or v["spurious"].any()]
                if not curves:
                    continue
                label = f"n={n}" if color is None else None
                line, = ax.plot(ROC_GRID, np.maximum(np.mean(curves, axis=0), 1e-5), dashes, lw=1, color=color,
                                label=label)
                color = line.get_color()
        ax.plot([1e-5, 1], [1e-5, 1], color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(1e-4, 1)
        ax.set_ylim(1e-4, 1)
        ax.set_xlabel("false positive rate")
        ax.set_title(f"{attack} attack (mean over seeds; dashed: spurious members)", fontsize=style.TITLE_SIZE)
    if attacks:
        axes[0].set_ylabel("true positive rate")
        axes[0].legend(fontsize=6, loc="lower right")
    return fig