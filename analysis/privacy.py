"""DP-SGD in a training study's report (protocol §10.5): each DP setting's privacy guarantee beside the spurious
score it leaves, and DP against L2 and input noise at matched clean accuracy.

`privacy_table` — one row per DP setting (noise multiplier σ, clip norm C) × pattern × n > 0: ε at the δ used
(identical over the cell's replicates: it depends on σ, the sample rate and the steps), the group-privacy
bound for the n planted images (nε, δ_n = n·e^{(n−1)ε}·δ, "vacuous" once δ_n reaches 1: the bound then says
nothing), the spurious score and clean test accuracy (mean ± s.e. over replicates), and the unmitigated cell's
score for reference.

`matched_table` — per DP setting, the L2 setting and the input-noise setting whose clean VALIDATION accuracy
(mean over every cell they share; test accuracy only for a study without a validation split, and the text
then says so) is closest to the DP setting's, and the test spurious score of each per pattern × n. Matching
on validation keeps the test split out of the choice of what to compare. This is a reading aid, not a test:
no p-value is computed, so compare the means with their standard errors. A study without L2 or noise
settings gets no matched table.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import stats
from analysis.frames import finished
from spurious.patterns import short_name

# The mitigation settings of a training cell (protocol §10.1, §10.5); the rest of a cell is pattern × n.
SETTING = ("l2", "noise_sigma", "grad_clip", "dp_noise_multiplier", "dp_max_grad_norm")
CELL = ("dataset", "model", "pattern", "n_spurious", "target")


def kind(row) -> str:
    """Return the mitigation a setting applies alone: "none", "dp", "l2", "noise", "clip", or "mixed"."""
    on = [name for name, key in (("dp", "dp_noise_multiplier"), ("l2", "l2"), ("noise", "noise_sigma"),
                                 ("clip", "grad_clip")) if float(row.get(key, 0.0) or 0.0) > 0]
    return on[0] if len(on) == 1 else ("none" if not on else "mixed")


def _trials(df: pd.DataFrame) -> pd.DataFrame:
    done = finished(df[df["kind"] == "train"] if "kind" in df else df).copy()
    for key in SETTING:
        if key not in done:
            done[key] = 0.0
    done["mitigation"] = [kind(r) for r in done[list(SETTING)].to_dict(orient="records")]
    if "pattern" in done:  # the paper's names (R3, not uniform_noise_1.0), as the other tables
        done["pattern"] = done["pattern"].map(lambda p: short_name(p) if isinstance(p, str) else p)
    return done


def has_dp(df: pd.DataFrame) -> bool:
    """Return whether `df` holds finished DP training trials (with a reported ε)."""
    if "dp_epsilon" not in df:
        return False
    done = _trials(df)
    return bool(((done["mitigation"] == "dp") & done["dp_epsilon"].notna()).any())


def _cells(done: pd.DataFrame) -> list[str]:
    return [k for k in CELL if k in ("pattern", "n_spurious") or (k in done and done[k].astype(str).nunique() > 1)]


def _pm(values: pd.Series, digits: int = 3) -> str:
    values = values.astype(float).dropna()
    if values.empty:
        return "—"
    cell = stats.mean_se(pd.DataFrame({"value": values, "cell": 0}), ["cell"], "value").iloc[0]
    return stats.cell(float(cell["mean"]), float(cell["se"]), digits)


def group_text(n: int, group_epsilon: float, group_delta: float) -> str:
    """Return the group bound of n planted images as text: "nε=…, δ=…", or "… (vacuous: δ = 1)"."""
    if n <= 1:
        return "(one image: ε itself)"
    return f"{group_epsilon:.3g} ({'vacuous: δ = 1' if group_delta >= 1 else f'δ={group_delta:.2g}'})"


def privacy_table(df: pd.DataFrame) -> pd.DataFrame:
    """Return one row per DP setting × cell with n > 0 (module docstring): the cell keys, `dp_noise_multiplier`,
    `dp_max_grad_norm`, `epsilon`, `delta`, `group_bound` (text), `spurious_score`, `test_acc` (text, mean ± s.e.),
    `replicates`, `n0_score` (the same DP setting and cell at n = 0: the score a model without planted images
    shows, the floor to read the others against), `unmitigated_score` (the cell without any mitigation; "—"
    when the study has none)."""
    done = _trials(df)
    cells = _cells(done)
    dp_trials = done[done["mitigation"] == "dp"]
    private = dp_trials[dp_trials["n_spurious"] > 0]
    plain = done[done["mitigation"] == "none"]
    rows = []
    for key, group in private.groupby(cells + ["dp_noise_multiplier", "dp_max_grad_norm"], sort=True):
        where = dict(zip(cells + ["dp_noise_multiplier", "dp_max_grad_norm"], key))
        first = group.iloc[0]
        base = plain
        for c in cells:
            base = base[base[c] == where[c]]
        clean = dp_trials[(dp_trials["n_spurious"] == 0)
                          & (dp_trials["dp_noise_multiplier"] == where["dp_noise_multiplier"])
                          & (dp_trials["dp_max_grad_norm"] == where["dp_max_grad_norm"])]
        for c in cells:
            if c != "n_spurious":
                clean = clean[clean[c] == where[c]]
        rows.append({**where, "epsilon": float(first["dp_epsilon"]), "delta": float(first["dp_delta_used"]),
                     "group_bound": group_text(int(where["n_spurious"]), float(first["dp_group_epsilon"]),
                                               float(first["dp_group_delta"])),
                     "spurious_score": _pm(group["spurious_score"]), "test_acc": _pm(group["test_acc"], 4),
                     "replicates": len(group), "n0_score": _pm(clean["spurious_score"]),
                     "unmitigated_score": _pm(base["spurious_score"])})
    return pd.DataFrame(rows)


def _setting_label(row) -> str:
    k = kind(row)
    if k == "dp":
        return f"DP σ={row['dp_noise_multiplier']:.3g} C={row['dp_max_grad_norm']:.3g}"
    return {"l2": f"L2 {row['l2']:.3g}", "noise": f"noise σ={row['noise_sigma']:.3g}",
            "clip": f"clip {row['grad_clip']:.3g}"}.get(k, "none" if k == "none" else "mixed")


def match_column(df: pd.DataFrame) -> str:
    """Return the accuracy `matched_table` matches on: `val_acc` when every finished training trial has one,
    else `test_acc`."""
    done = _trials(df)
    return "val_acc" if "val_acc" in done and len(done) and done["val_acc"].notna().all() else "test_acc"


def matched_table(df: pd.DataFrame) -> pd.DataFrame:
    """Return, per DP setting and cell (n = 0 included: the floor of each setting), the DP setting's score and the scores of the L2 and the
    input-noise settings whose mean clean accuracy (`match_column`: validation when the study has it) over the
    cells they share is closest to the DP setting's (module docstring): columns cell keys, `dp` (label),
    `dp_acc`, `dp_score`, `l2`, `l2_acc`, `l2_gap`, `l2_score`, `noise`, `noise_acc`, `noise_gap`,
    `noise_score` (accuracies: the matched column's mean over the shared cells; gaps: rival − DP accuracy, so a
    far match shows; scores: test spurious score as text, mean ± s.e. over the cell's replicates). Empty when
    the study has no DP, or neither L2 nor noise settings."""
    column = match_column(df)
    done = _trials(df)
    cells = _cells(done)
    done = done.assign(setting=[_setting_label(r) for r in done[list(SETTING)].to_dict(orient="records")])
    dp_settings = sorted(done.loc[done["mitigation"] == "dp", "setting"].unique())
    rivals = {m: sorted(done.loc[done["mitigation"] == m, "setting"].unique()) for m in ("l2", "noise")}
    if not dp_settings or not any(rivals.values()):
        return pd.DataFrame()
    cell_sets = {s: set(map(tuple, g[cells].astype(str).to_numpy())) for s, g in done.groupby("setting")}

    def accuracy(setting: str, shared: set) -> float:
        part = done[done["setting"] == setting]
        keep = [tuple(r) in shared for r in part[cells].astype(str).to_numpy()]
        return float(part[np.array(keep, dtype=bool)][column].mean())

    rows = []
    for private in dp_settings:
        dp_acc = accuracy(private, cell_sets[private])
        matches = {}
        for m, options in rivals.items():
            scored = [(abs(accuracy(o, cell_sets[private] & cell_sets[o]) - dp_acc), o) for o in options
                      if cell_sets[private] & cell_sets[o]]
            matches[m] = min(scored)[1] if scored else None
        for key, group in done[done["setting"] == private].groupby(cells, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            row = {**dict(zip(cells, key)), "dp": private, "dp_acc": round(dp_acc, 4),
                   "dp_score": _pm(group["spurious_score"])}
            for m in ("l2", "noise"):
                other = matches[m]
                part = done[done["setting"] == other] if other else done.iloc[0:0]
                for c, v in zip(cells, key):
                    part = part[part[c] == v]
                shared = cell_sets[private] & cell_sets.get(other, set())
                acc = accuracy(other, shared) if other else math.nan
                row.update({m: other or "—", f"{m}_acc": round(acc, 4), f"{m}_gap": round(acc - dp_acc, 4),
                            f"{m}_score": _pm(part["spurious_score"])})
            rows.append(row)
    return pd.DataFrame(rows)


def sections(df: pd.DataFrame) -> list[tuple[str, str, list]]:
    """Return the report's DP section as (title, plain text, []) — nothing for a study without DP trials."""
    if not has_dp(df):
        return []
    text = ("Each DP setting's ε at the δ used (RDP accountant, after the run's epochs) and the group-privacy bound "
            "for the n planted images (nε, δ_n = n·e^((n−1)ε)·δ; vacuous once δ_n reaches 1), beside the spurious "
            "score and clean test accuracy it leaves (mean ± s.e. over replicates), the same setting's score at "
            "n = 0 (no planted image: what the pattern does to a model that never saw it) and the unmitigated "
            "cell's score (protocol §10.5).\n\n" + privacy_table(df).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    matched = matched_table(df)
    if not matched.empty:
        on = ("validation accuracy" if match_column(df) == "val_acc" else
              "TEST accuracy (the study has no validation split: the match reads the test split)")
        text += ("\n\nDP against L2 and input noise at matched clean accuracy: for each DP setting, the L2 and the "
                 f"noise setting whose mean clean {on} (over the cells they share; the *_acc columns, *_gap = "
                 "rival − DP: a large gap means no setting of the study matches) is closest; the test spurious "
                 "score of each per cell (mean ± s.e. over replicates). No test is run: compare means with their "
                 "standard errors.\n\n"
                 + matched.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return [("DP-SGD: privacy guarantee and the planted pattern", text, [])]
