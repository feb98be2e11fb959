"""Aggregates ground-truth study points: seed intervals, paired tests against solo, verdicts, report files, plots.

Legend: n = seeds at one (scenario, λ₂) point; Δ = joint − solo (or matryoshka − solo) on the same seed (same
init, same batches).
"""

import math
import os
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402

from metasae_jax.evaluation import plots  # noqa: E402
from metasae_jax.storage import atomic  # noqa: E402

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS = "plots"
# Metrics a verdict is based on (higher is better for both).
VERDICT_METRICS = ("recovery", "purity")
# Every numeric score aggregated; True where higher is better.
METRICS = {"recovery": True, "mean_max_cos": True, "purity": True, "purity_weighted": True,
           "pure_fraction": True, "clean_fraction": True, "split_fraction": False, "composite_latents": False,
           "structured_composites": False, "absorbing_latents": False, "latents_per_feature": None,
           "mean_abs_phi": None, "mse": False, "l0": None, "dead_fraction": False}
ASSUMPTIONS = ("paired two-sided t-test on per-seed differences joint − solo (each joint SAE against the solo "
               "SAE trained in lockstep with it: same init, same batches); assumes the seed differences are "
               "independent draws from a normal distribution. With few seeds it only detects large, consistent "
               "effects; a seed set where every difference is identical and nonzero counts as detected. No "
               "correction for testing several λ₂ values.")


def interval(values) -> dict:
  """Mean and two-sided 95 % t-interval of the mean (a zero-width interval when all values agree)."""
  v = np.asarray(values, np.float64)
  mean = float(v.mean())
  if v.size < 2:
    return {"mean": mean, "lo": mean, "hi": mean, "n": int(v.size)}
  half = float(scipy.stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
  return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(v.size)}


def paired(joint, solo) -> dict:
  """Paired test of joint vs solo over seeds: mean Δ, its 95 % interval, p-value and the sign detected."""
  d = np.asarray(joint, np.float64) - np.asarray(solo, np.float64)
  out = interval(d)
  if np.all(d == 0):
    out.update(p=1.0, effect=0)
  elif np.all(d == d[0]):
    out.update(p=0.0, effect=int(np.sign(d[0])))
  else:
    p = float(scipy.stats.ttest_rel(joint, solo).pvalue)
    out.update(p=p, effect=int(np.sign(out["mean"])) if p < 0.05 else 0)
  return out


def _verdict_word(effects: list, subject: str = "penalty") -> str:
  if any(e > 0 for e in effects) and not any(e < 0 for e in effects):
    return f"{subject} helps"
  if any(e < 0 for e in effects) and not any(e > 0 for e in effects):
    return f"{subject} hurts"
  if effects and any(effects):
    return "mixed (helps at some λ₂ or metric, hurts at another)"
  return "no detectable effect at 95 %"


def _findings(label: str, delta: dict, effects: list, findings: list, subject: str = "joint") -> None:
  for m in VERDICT_METRICS:
    d = delta[m]
    effects.append(d["effect"])
    word = {1: "higher", -1: "lower", 0: "no detectable difference"}[d["effect"]]
    findings.append(f"{label}{m}: {subject} {word} (Δ {d['mean']:+.3f}, 95 % CI "
                    f"[{d['lo']:+.3f}, {d['hi']:+.3f}], p={d['p']:.3g}, n={d['n']})")


def _matryoshka(rows: list, points: list) -> Optional[dict]:
  """The matryoshka arm's seed intervals and its paired Δ against the solo SAE of the same seed (same init,
  same batches; the solo SAE does not depend on λ₂, so the first point's is taken)."""
  mat = {r["seed"]: r for r in rows if r.get("arm") == "matryoshka"}
  if not mat or not points:
    return None
  solo_by_seed = {r["seed"]: r["solo"] for r in rows if r.get("arm") is None and r["lambda2"] == points[0]["lambda2"]}
  seeds = sorted(s for s in mat if s in solo_by_seed)
  out = {"seeds": seeds, "train": mat[seeds[0]].get("train", {}) if seeds else {}, "scores": {}, "delta": {}}
  for m in METRICS:
    if not seeds or mat[seeds[0]]["matryoshka"].get(m) is None:
      continue
    v = [mat[s]["matryoshka"][m] for s in seeds]
    out["scores"][m], out["delta"][m] = interval(v), paired(v, [solo_by_seed[s][m] for s in seeds])
  effects, findings = [], []
  if seeds:
    _findings("matryoshka vs solo ", out["delta"], effects, findings, subject="matryoshka")
  out["verdict"], out["findings"] = _verdict_word(effects, "matryoshka"), findings
  return out


def aggregate(results: list) -> dict:
  """Per scenario and λ₂: seed intervals of every metric for joint and solo, paired Δ, and a verdict; the
  matryoshka arm (when trained) with its seed intervals and its paired Δ against solo."""
  out = {}
  for name in dict.fromkeys(r["scenario"] for r in results):
    everything = [r for r in results if r["scenario"] == name]
    rows = [r for r in everything if r.get("arm") is None]
    lams = sorted({r["lambda2"] for r in rows})
    points = []
    for lam in lams:
      at = sorted((r for r in rows if r["lambda2"] == lam), key=lambda r: r["seed"])
      point = {"lambda2": lam, "seeds": [r["seed"] for r in at], "joint": {}, "solo": {}, "delta": {}}
      for m in METRICS:
        if at[0]["joint"].get(m) is None:
          continue
        j = [r["joint"][m] for r in at]
        s = [r["solo"][m] for r in at]
        point["joint"][m], point["solo"][m], point["delta"][m] = interval(j), interval(s), paired(j, s)
      points.append(point)
    control = [p for p in points if p["lambda2"] == 0]
    findings, effects = [], []
    for p in points:
      if p["lambda2"] != 0:
        _findings(f"λ₂={p['lambda2']:g} ", p["delta"], effects, findings)
    out[name] = {
        "matryoshka": _matryoshka(everything, points),
        "points": points,
        "verdict": _verdict_word(effects),
        "findings": findings,
        # λ₂ = 0 trains joint and solo identically; any nonzero difference would break the pairing.
        "control_max_abs_delta": (max(abs(d["mean"]) for d in control[0]["delta"].values()) if control else None),
    }
  return out


def plot_scenario(name: str, agg: dict, path: str) -> str:
  """Recovery and firing purity vs λ₂ (95 % seed intervals), joint vs solo."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  lams = [p["lambda2"] for p in agg["points"]]
  xs = np.arange(len(lams))
  for ax, metric, label in ((axes[0], "recovery", "atoms recovered / true features"),
                            (axes[1], "purity", "mean firing purity")):
    for which, offset, color in (("joint", -0.06, "tab:blue"), ("solo", 0.06, "tab:orange")):
      iv = [p[which][metric] for p in agg["points"]]
      mean = np.array([v["mean"] for v in iv])
      err = np.array([[v["mean"] - v["lo"] for v in iv], [v["hi"] - v["mean"] for v in iv]])
      ax.errorbar(xs + offset, mean, yerr=err, marker="o", capsize=3, label=which, color=color)
    mat = agg.get("matryoshka")
    if mat and metric in mat["scores"]:
      iv = mat["scores"][metric]
      ax.axhline(iv["mean"], color="tab:green", label="matryoshka (no λ₂)")
      ax.axhspan(iv["lo"], iv["hi"], color="tab:green", alpha=0.15)
    ax.set_xticks(xs, [f"{v:g}" for v in lams])
    ax.set_xlabel("λ₂")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"{name}: {agg['verdict']}")
  return plots.save_png(fig, path)


def _fmt(iv: dict) -> str:
  return f"{iv['mean']:.3f} [{iv['lo']:.3f}, {iv['hi']:.3f}]"


def summary_table(agg: dict) -> list:
  """One row per scenario and λ₂ > 0: joint and solo means, paired Δ with its interval, the verdict."""
  lines = ["| scenario | λ₂ | recovery joint / solo | Δ recovery [95 % CI] | purity joint / solo | "
           "Δ purity [95 % CI] | Δ weighted purity [95 % CI] | Δ mean abs φ | Δ MSE | Δ dead | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, a in agg.items():
    for p in a["points"]:
      if p["lambda2"] == 0:
        continue
      j, s, d = p["joint"], p["solo"], p["delta"]
      lines.append(
          f"| {name} | {p['lambda2']:g} | {j['recovery']['mean']:.3f} / {s['recovery']['mean']:.3f} | "
          f"{d['recovery']['mean']:+.3f} [{d['recovery']['lo']:+.3f}, {d['recovery']['hi']:+.3f}] | "
          f"{j['purity']['mean']:.3f} / {s['purity']['mean']:.3f} | "
          f"{d['purity']['mean']:+.3f} [{d['purity']['lo']:+.3f}, {d['purity']['hi']:+.3f}] | "
          f"{d['purity_weighted']['mean']:+.3f} [{d['purity_weighted']['lo']:+.3f}, "
          f"{d['purity_weighted']['hi']:+.3f}] | {d['mean_abs_phi']['mean']:+.4f} | {d['mse']['mean']:+.4f} | "
          f"{d['dead_fraction']['mean']:+.3f} | "
          f"{a['verdict']} |")
  return lines


def _pm(d: dict, spec: str = "+.3f") -> str:
  return f"{d['mean']:{spec}} [{d['lo']:{spec}}, {d['hi']:{spec}}]"


def arms_table(agg: dict) -> list:
  """Which method recovers the true features, at what reconstruction cost: per scenario the solo SAE, the
  joint SAE at each λ₂ > 0 and the solo Matryoshka SAE, each with seed intervals and its paired Δ vs solo."""
  lines = ["| scenario | SAE | recovery [95 % CI] | Δ recovery vs solo [95 % CI] | weighted purity | "
           "absorbing latents | MSE [95 % CI] | Δ MSE vs solo [95 % CI] | dead |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, a in agg.items():
    if not a["points"]:
      continue
    solo = a["points"][0]["solo"]
    rows = [("solo BatchTopK", solo, None)]
    rows += [(f"joint MetaSAE λ₂={p['lambda2']:g}", p["joint"], p["delta"]) for p in a["points"] if p["lambda2"] > 0]
    if a.get("matryoshka"):
      rows.append(("solo Matryoshka", a["matryoshka"]["scores"], a["matryoshka"]["delta"]))
    for label, sc, d in rows:
      absorbing = f"{sc['absorbing_latents']['mean']:.1f}" if "absorbing_latents" in sc else "–"
      lines.append(f"| {name} | {label} | {_fmt(sc['recovery'])} | {_pm(d['recovery']) if d else '–'} | "
                   f"{sc['purity_weighted']['mean']:.3f} | {absorbing} | {sc['mse']['mean']:.4f} "
                   f"[{sc['mse']['lo']:.4f}, {sc['mse']['hi']:.4f}] | "
                   f"{_pm(d['mse'], '+.4f') if d else '–'} | "
                   f"{sc['dead_fraction']['mean']:.3f} |")
  return lines


def markdown(config, agg: dict) -> str:
  """report.md: the setup, per scenario its generator, a table over λ₂ and the verdict."""
  t = config.shared_train()
  arms = ("; per seed a solo Matryoshka BatchTopK SAE (same width, k, init and batches, prefixes "
          f"{', '.join(map(str, config.matryoshka_widths()))}, {t['width']})" if "matryoshka" in config.arms() else "")
  lines = ["# Ground-truth atomicity study", "",
           f"SAE width {t['width']}, k {t['k']}, meta width {t['meta_width']}, "
           f"meta k {t['meta_k']}, σ² {t['sigma_sq']}, penalty gradient `{t['penalty_grad']}`, "
           f"{config.steps} steps × {t['batch_size']} tokens, lr {t['lr']}, AuxK k {t['aux_k']}, "
           f"{config.seeds} seeds{arms}; scores on {config.heldout_tokens} held-out tokens. "
           "Definitions: docs/groundtruth.md.", "",
           f"Test: {ASSUMPTIONS}", "",
           "Cells: mean [95 % t-interval over seeds]; Δ = joint − solo (or matryoshka − solo) paired by seed.", ""]
  lines += summary_table(agg) + [""]
  lines += ["## Methods side by side", ""] + arms_table(agg) + [""]
  scen = dict(config.scenarios)
  for name, a in agg.items():
    lines += [f"## {name}: {a['verdict']}", "", f"Generator `{scen[name].kind}`: "
              + ", ".join(f"{k}={v}" for k, v in scen[name].to_dict().items() if k != "kind")
              + f" ({scen[name].num_true_features} true features).", ""]
    lines += ["| λ₂ | recovery joint | recovery solo | Δ recovery | purity joint | purity solo | Δ purity | "
              "split frac j/s | composites j/s | absorbing j/s | mean abs φ j/s | MSE j/s | dead j/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in a["points"]:
      j, s, d = p["joint"], p["solo"], p["delta"]

      def js(m, f="{:.3f}"):
        return f"{f.format(j[m]['mean'])} / {f.format(s[m]['mean'])}" if m in j else "–"

      lines.append(f"| {p['lambda2']:g} | {_fmt(j['recovery'])} | {_fmt(s['recovery'])} | {_fmt(d['recovery'])} | "
                   f"{_fmt(j['purity'])} | {_fmt(s['purity'])} | {_fmt(d['purity'])} | {js('split_fraction')} | "
                   f"{js('composite_latents', '{:.1f}')} | {js('absorbing_latents', '{:.1f}')} | "
                   f"{js('mean_abs_phi', '{:.4f}')} | {js('mse', '{:.4f}')} | {js('dead_fraction', '{:.2f}')} |")
    lines += [""] + [f"- {f}" for f in a["findings"]]
    if a.get("matryoshka"):
      lines += [f"- {f}" for f in a["matryoshka"]["findings"]]
    if a["control_max_abs_delta"] is not None:
      lines.append(f"- control λ₂=0: largest |Δ| over all metrics {a['control_max_abs_delta']:.3g} "
                   "(0 expected: joint and solo train identically)")
    lines += ["", f"![{name}]({PLOTS}/{name}.png)", ""]
  return "\n".join(lines)


def write_report(config, results: list) -> dict:
  """Writes report.json, report.md and plots/<scenario>.png into the study directory."""
  agg = aggregate(results)
  os.makedirs(os.path.join(config.out_dir, PLOTS), exist_ok=True)
  for name, a in agg.items():
    plot_scenario(name, a, os.path.join(config.out_dir, PLOTS, f"{name}.png"))
  report = {"config": config.identity(), "test": ASSUMPTIONS,
            "scenarios": {name: dict(a, generator=dict(config.scenarios)[name].to_dict()) for name, a in agg.items()},
            "points": results}
  atomic.write_json(os.path.join(config.out_dir, REPORT_JSON), report)
  atomic.write_text(os.path.join(config.out_dir, REPORT_MD), markdown(config, agg))
  return report
