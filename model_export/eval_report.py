"""The `recserve eval` report as files: eval.json, eval.md (every number from the JSON) and a bar
chart eval.png of the lists. The verdict says in words where the served lists lose to a baseline,
with a paired bootstrap interval over users. matplotlib is imported only here, only when a chart
is drawn (it is a test/loadtest extra; serving never imports it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

BOOTSTRAP = 2000
BASELINE_NAMES = {"popularity": "popularity", "itemknn": "ItemKNN", "ease": "EASE"}


def write_report(report: dict[str, Any], out: Path) -> str:
    """Write eval.json, eval.md and eval.png under `out`; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    report["chart"] = chart(report, out / "eval.png")
    text = markdown(report)
    (out / "eval.md").write_text(text)
    return text


def headline(report: dict[str, Any]) -> list[str]:
    """The metrics lists are compared on: utility_norm under a truth, else recall and NDCG."""
    first = next(iter(report["lists"].values()))
    return ["utility_norm"] if "utility_norm" in first else [m for m in first if m.startswith(("recall@", "ndcg@"))]


def paired_ci(a: list[float], b: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over users and its 95% paired bootstrap interval."""
    d = np.asarray(a) - np.asarray(b)
    boot = d[np.random.default_rng(seed).integers(0, d.size, (BOOTSTRAP, d.size))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def verdict(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Served against each baseline on each headline metric: the difference, its interval and a
    sentence that says plainly when the served lists lose."""
    lists, users = report["lists"], report.get("per_user", {})
    rows = []
    for metric in headline(report):
        served = lists["served"][metric]
        for b, name in BASELINE_NAMES.items():
            if b not in lists:
                continue
            base = lists[b][metric]
            d, lo, hi = paired_ci(users["served"][metric], users[b][metric])
            if lo > 0:
                word = "beat"
            elif hi < 0:
                word = "lose to"
            else:
                word = "tie with" if served >= base else "lose (within noise) to"
            rows.append({"metric": metric, "baseline": name, "served": served, "baseline_value": base,
                         "difference": d, "ci95": [lo, hi], "outcome": word,
                         "text": f"served {metric} {served:.4f} vs {name} {base:.4f}: the served lists {word} "
                                 f"{name} ({d:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] over users)"})
    return rows


def chart(report: dict[str, Any], path: Path) -> str:
    """A grouped bar chart of every list on the headline metrics; '' when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    metrics = headline(report)
    names = list(report["lists"])
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.6))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        vals = [report["lists"][n][metric] for n in names]
        bars = ax.bar(np.arange(len(names)) + (k - (len(metrics) - 1) / 2) * width, vals, width, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(np.arange(len(names)), [BASELINE_NAMES.get(n, n) for n in names])
    ax.set_title(f"{report['bundle']['dataset']} ({report['protocol']['split']} split), "
                 f"{report['protocol']['users']} users")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    return "\n".join([f"| {' | '.join(cols)} |", f"|{'---|' * len(cols)}",
                      *(f"| {' | '.join(cell(r.get(c, '')) for c in cols)} |" for r in rows)])


def markdown(r: dict[str, Any]) -> str:
    """The report as Markdown, every number from the JSON."""
    p, a, c, b = r["protocol"], r["ann"], r["consistency"], r["baselines"]
    k = p["count"]
    list_cols = ["list", *next(iter(r["lists"].values())).keys()]
    sweep_cols = list(r["beam_sweep"]["rows"][0])
    auc = [{"model": mo, **ts} for mo, ts in r["auc"]["models"].items()]
    auc_cols = sorted({t for row in auc for t in row} - {"model"})
    clock = p["clock_days"]
    ease = b["ease"]
    grid = ", ".join(f"{float(lam):g}: {v:.4f}" for lam, v in ease["tuning_ndcg@20"].items())
    lost = [v["text"] for v in r["verdict"] if v["outcome"] not in ("beat", "tie with")]
    return "\n\n".join([
        f"# Evaluation of bundle {r['bundle']['version']} ({r['bundle']['dataset']}, {p['split']} split)",
        f"Config `{r['config']}`; {p['users']} {p['population']} (seed {p['seed']}); lists of {p['count']}; "
        f"feature state: {p['state']}; clock stopped at day {clock[0]:.2f}"
        + (f" to {clock[1]:.2f}" if clock[1] != clock[0] else "") + f"; {p['experiments']}; "
        f"deadline and route timeouts {p['deadline_ms']:.0f} ms ({p['faulty_responses']} responses with a route or "
        "stage cut, failed or skipped).",
        "## Verdict\n\n" + "\n".join(f"- {v['text']}" for v in r["verdict"])
        + ("\n\n**The served lists lose to a baseline:** " + "; ".join(lost) + "." if lost else
           "\n\nThe served lists lose to no baseline."),
        "## Lists\n\nserved: the engine's list; ranker: top by fine ranker + fusion over the whole eligible "
        "catalog (no funnel, no beam); oracle: top by true fused value; popularity: most interacted items; "
        "ItemKNN: cosine item-item over the user's interactions (all neighbours); EASE: the closed form over "
        f"{ease['items']} items ({'the whole catalog' if ease['all_items'] else 'the most interacted'}), lambda "
        f"{ease['lambda']:g} tuned by NDCG@20 on the training part's own held-out slice ({grid}); random: "
        f"uniform. The baselines learn from the same {b['interactions']} training interactions the bundle may "
        "learn from; every list comes from the same eligible items (the served pipeline's seen, blocked and "
        "excluded filters). utility: sum over positions of the true fused value / log2(pos + 2), with the served "
        "rerank's fusion; utility_norm: (mean utility - mean expected utility of a uniform list) / (oracle's - "
        "that). recall@k / ndcg@k: against the user's held-out positives. diversity: distinct categories per "
        "list; coverage: distinct items over all users / catalog; cold_share: slots holding items without "
        "impressions in the state.\n\n"
        + _table([{"list": name, **v} for name, v in r["lists"].items()], list_cols)
        + (f"\n\n![lists]({r['chart']})" if r.get("chart") else ""),
        f"## ANN recall\n\nRecall@k of the {a['kind']} index (nprobe {a['nprobe']}) against exact inner-product search "
        f"over item_emb, on the {a['queries']} users' real user-tower embeddings (one query per user): "
        + ", ".join(f"**{v:.4f}** at k={kk}" for kk, v in a["recall"].items())
        + f". The ann route asks for k={a['served_k']}; the build measured {a['build']['recall']:.4f} at "
        f"k={a['build']['k']} on its own queries (sampled held-out rows).",
        f"## AUC\n\nFrom the {r['auc']['source']}.\n\n" + _table(auc, ["model", *auc_cols]),
        f"## Pipeline consistency\n\nShare of the served top-{k} that is also in the top-{k} of the fine ranker + "
        f"fusion over the whole eligible catalog (same seen/blocked/excluded filters): mean "
        f"**{c[f'overlap@{k}']:.4f}**, p10 {c['p10']:.4f}, min {c['min']:.4f}.",
        f"## Beam width (stage `{r['beam_sweep']['stage']}`, served width {r['beam_sweep']['served_beam_width']})\n\n"
        "Each width served to the same users through the same engine; rerank ms from the response trace; "
        "reward: the beam search's own objective (fused score / log2(pos + 2) minus category and author "
        "repeat penalties plus the coverage reward) of the served list.\n\n"
        + _table(r["beam_sweep"]["rows"], sweep_cols),
    ]) + "\n"
