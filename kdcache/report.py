"""``kdcache report``: a markdown table of runs and a plot of test error against temperature."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcache.errors import ConfigError, KdcacheError

ROLES = ("teacher", "baseline", "distilled")  # what a run is in a report (--role ROLE=DIR)

PAPERS = {
    "hinton-mnist": {
        "title": "Hinton, Vinyals, Dean (2015), MNIST, test errors out of 10,000",
        "rows": {"teacher": 67, "baseline": 146, "distilled": 74},
        "labels": {"teacher": "teacher 784-1200-1200-10", "baseline": "student 784-800-800-10 alone",
                   "distilled": "student 784-800-800-10 distilled"},
    },
    # Section 4 (speech): frame accuracy in %, higher is better; kdcache's column is MNIST test errors.
    "hinton-ensemble": {
        "title": "Hinton, Vinyals, Dean (2015), section 4: the paper's column is frame accuracy (%) on speech, "
                 "kdcache's is test errors",
        "rows": {"baseline": 58.9, "ensemble": 61.1, "distilled": 60.8},
        "labels": {"baseline": "a single model alone", "ensemble": "the ensemble of its {members} ({rule})",
                   "distilled": "one model of the same size, distilled from the ensemble"},
        "higher_is_better": True,
    },
}


def collect_runs(dirs: list[str]) -> list[dict[str, Any]]:
    """Every run under ``dirs``: a run directory (metrics.json) or a sweep (sub-directories of runs)."""
    runs = []
    for d in map(Path, dirs):
        found = [d] if (d / "metrics.json").exists() else sorted(p.parent for p in d.glob("*/metrics.json"))
        if not found:
            raise KdcacheError(f"{d} holds no kdcache run (no metrics.json in it or its sub-directories); "
                               f"pass the {{param:out}} directory of train-student")
        for r in found:
            config = json.loads((r / "config.json").read_text())
            metrics = json.loads((r / "metrics.json").read_text())
            last = metrics[-1]
            ident = config.get("store_identity") or {}
            from kdcache.datasets import recorded_model_spec
            specs = [recorded_model_spec(m["spec"], config.get("store")) for m in ident.get("members", [])]
            teacher = (", ".join(specs) if len(specs) <= 3 else
                       f"{len(specs)} members: {specs[0]}, {specs[1]}, ..., {specs[-1]}") if specs else "-"
            from_teacher = bool(config.get("store") or config.get("teachers"))
            runs.append({
                "dir": str(r), "group": str(d), "student": config["arch"], "teacher": teacher, "teacher_specs": specs,
                "inputs": _inputs(config, ident),
                "distilled": from_teacher and config["alpha"] > 0,
                "temperature": config["temperature"] if from_teacher else None, "alpha": config["alpha"],
                "soft_loss": (config.get("soft_loss") or "kd") if from_teacher else None,
                "seed": config["seed"], "lr": config.get("lr"), "epochs": len(metrics),
                "test_errors": last.get("eval_errors"),
                "test_accuracy": last.get("eval_accuracy"), "teacher_agreement": last.get("teacher_agreement"),
                "teacher_errors": last.get("teacher_errors"), "ensemble": config.get("ensemble"),
                "test_perplexity": last.get("eval_perplexity"), "diverged": bool(last.get("diverged")),
                "wall_seconds": sum(m["seconds"] for m in metrics)})
    runs.sort(key=lambda r: (dirs.index(r["group"]), r.get("soft_loss") == "logit-mse", r["temperature"] or 0,
                             r["alpha"], r["seed"]))
    return runs


def parse_roles(items: list[str]) -> dict[str, list[str]]:
    """``["teacher=runs/t", "distilled=runs/a", "distilled=runs/b"]`` -> ROLE -> directories, in order."""
    roles: dict[str, list[str]] = {}
    for item in items:
        role, eq, path = item.partition("=")
        if not eq or role not in ROLES:
            raise ConfigError(f"{{param:role}} {item!r}: expected ROLE=DIR with ROLE one of {', '.join(ROLES)}")
        roles.setdefault(role, []).append(path)
    return roles


def assign_roles(runs: list[dict[str, Any]], roles: dict[str, list[str]] | None = None) -> None:
    """Set each run's ``role``: the one ``roles`` (ROLE -> run or sweep directories) gives it, else
    ``teacher`` for a run another run distilled from, ``distilled`` for a student with soft targets, and
    ``baseline`` for the rest."""
    by_dir = {str(Path(d).resolve()): role for role, dirs in (roles or {}).items() for d in dirs}
    used = set()
    for r in runs:
        for spec in r["teacher_specs"]:
            used.add(str(Path(spec[3:] if spec.startswith("hf:") else spec).resolve()))
            if spec.startswith("hf:"):
                used.add(str(Path(spec[3:]).resolve().parent))  # RUN/hf: the run that saved it
    for r in runs:
        here = str(Path(r["dir"]).resolve())
        r["role"] = (by_dir.get(here) or by_dir.get(str(Path(r["group"]).resolve()))
                     or ("teacher" if here in used else "distilled" if r["distilled"] else "baseline"))


def report_json(runs: list[dict[str, Any]], paper: str | None = None, notes: list[str] | None = None
                ) -> dict[str, Any]:
    """What ``report.json`` holds: every run with its role and results, and the paper's figures."""
    keys = ("dir", "role", "teacher", "student", "inputs", "soft_loss", "temperature", "alpha", "lr", "seed", "epochs",
            "test_errors", "test_accuracy", "teacher_agreement", "teacher_errors", "test_perplexity", "diverged",
            "wall_seconds")
    out: dict[str, Any] = {"notes": notes or [],
                           "runs": [{("spec" if k == "student" else k): r.get(k) for k in keys} for r in runs]}
    if paper:
        out["paper"] = {"name": paper, **PAPERS[paper]}
    return out


def _inputs(config: dict[str, Any], ident: dict[str, Any]) -> str:
    """What the student saw and where its targets came from: plain or augmented inputs, cached views
    or an online teacher."""
    views = ident.get("views")
    if config.get("store"):
        return f"{views['augment']}, {views['count']} cached views" if views else "plain, cached"
    aug = config.get("augment") or (f"jitter:{config['jitter']}" if config.get("jitter") else None)
    if config.get("teachers"):
        return f"{aug or 'plain'}, online teacher"
    return aug or "plain"


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _t_cell(r: dict[str, Any]) -> str:
    """The T column: the temperature, or ``logit-mse`` for a logit-matching student (it has none)."""
    return "logit-mse" if r.get("soft_loss") == "logit-mse" else _fmt(r["temperature"], "g")


def markdown(runs: list[dict[str, Any]], roles: dict[str, list[str]] | None = None, paper: str | None = None) -> str:
    ppl = any(r.get("test_perplexity") is not None for r in runs)  # token-level runs (sequence data)
    lines = ["| run | teacher | student | inputs | T | alpha | lr | test errors | accuracy | agreement |"
             + (" perplexity |" if ppl else "") + " epochs | wall s |",
             "|" + "---|" * (13 if ppl else 12)]
    for r in runs:
        lines.append(f"| {r['dir']} | {r['teacher']} | {r['student']} | {r['inputs']} | {_t_cell(r)} | "
                     f"{r['alpha']:g} | {_fmt(r['lr'], 'g')} | "
                     f"{'diverged' if r['diverged'] else _fmt(r['test_errors'], 'd')} | "
                     f"{_fmt(r['test_accuracy'], '.4f')} | "
                     f"{_fmt(r['teacher_agreement'], '.4f')} |"
                     + (f" {_fmt(r.get('test_perplexity'), '.2f')} |" if ppl else "")
                     + f" {r['epochs']} | {r['wall_seconds']:.0f} |")
    lines += seed_summary(runs)
    if paper:
        if paper not in PAPERS:
            raise KdcacheError(f"{{param:paper}} {paper!r} is unknown; known: {', '.join(PAPERS)}")
        ref = PAPERS[paper]
        lines += ["", f"Side by side with {ref['title']}:", "",
                  "| model | paper | kdcache, best setting (mean ± std over seeds) | kdcache, every setting |",
                  "|---|---|---|---|"]
        mean_of: dict[str, float] = {}
        for role, paper_errors in ref["rows"].items():
            if role == "ensemble":  # the teacher itself: its errors on the distilled students' eval store
                group = ((roles or {}).get("distilled") or [None])[0]
                used = [r for r in runs if group and (r["group"] == group or r["dir"] == group)
                        and r.get("teacher_errors") is not None]
                errs = {r["teacher_errors"] for r in used}
                if len(errs) == 1:
                    mean_of[role] = float(min(errs))
                rules = {"mean-prob": "mean of probabilities", "mean-logit": "mean logit"}
                label = ref["labels"][role].format(
                    members=len(used[0]["teacher_specs"]) if used else "members",
                    rule=rules.get(used[0]["ensemble"], used[0]["ensemble"]) if used else "no --eval-store")
                lines.append(f"| {label} | {paper_errors} | "
                             f"{'-' if role not in mean_of else format(mean_of[role], '.0f')} | - |")
                continue
            group = ((roles or {}).get(role) or [None])[0]  # the first --role of each: the paper's setting
            mine = [r for r in runs if group and (r["group"] == group or r["dir"] == group)
                    and r["test_errors"] is not None and not r["diverged"]]
            settings = _by_setting(mine)
            best = min(settings, key=lambda st: st["mean"]) if settings else None
            if best is not None:
                mean_of[role] = best["mean"]
            best_s = "-" if best is None else f"{_setting(best, settings)}, {mine[0]['epochs']} epochs"
            every = "; ".join(_setting(st, settings) for st in settings) or "-"
            lines.append(f"| {ref['labels'][role]} | {paper_errors} | {best_s} | {every} |")
        if "ensemble" in ref["rows"]:
            lines += ["", gain_kept(ref["rows"], mean_of)]
    return "\n".join(lines)


def gain_kept(paper: dict[str, float], errors: dict[str, float]) -> str:
    """The fraction of the ensemble's gain over a single model that the distilled model keeps, the
    paper's (accuracy) and kdcache's (test errors, best distilled setting against the mean single model)."""
    p_gain, p_kept = paper["ensemble"] - paper["baseline"], paper["distilled"] - paper["baseline"]
    text = (f"Gain kept: in the paper the ensemble gains {p_gain:.1f} points over a single model and the distilled "
            f"model keeps {p_kept:.1f} of them ({p_kept / p_gain:.0%}).")
    if all(k in errors for k in ("baseline", "ensemble", "distilled")):
        gain, kept = errors["baseline"] - errors["ensemble"], errors["baseline"] - errors["distilled"]
        text += (f" Here the ensemble makes {gain:.1f} fewer test errors than a single model (mean over the members) "
                 f"and the distilled model {kept:.1f} fewer"
                 + (f": it keeps {kept / gain:.0%} of the gain." if gain > 0 else " (the ensemble gained nothing)."))
    return text


def _by_setting(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per setting (temperature, alpha, lr, soft loss), in order of T (logit matching, which
    has none, last): its mean test errors over seeds, their std (None for one seed) and the number of seeds."""
    by: dict[tuple, list[int]] = {}
    for r in runs:
        by.setdefault((r["temperature"], r["alpha"], r["lr"], r.get("soft_loss")), []).append(r["test_errors"])
    order = sorted(by, key=lambda k: (k[3] == "logit-mse", -1 if k[0] is None else k[0], k[1], k[2] or 0))
    return [dict(zip(("t", "alpha", "lr", "loss"), k)) | dict(zip(("mean", "std"), _mean_std(by[k])), n=len(by[k]))
            for k in order]


def _mean_std(errs: list[int]) -> tuple[float, float | None]:
    mean = sum(errs) / len(errs)
    return mean, (sum((e - mean) ** 2 for e in errs) / (len(errs) - 1)) ** 0.5 if len(errs) > 1 else None


def _setting(st: dict[str, Any], settings: list[dict[str, Any]]) -> str:
    """``T=2: 104.3 ± 3.1 (3 seeds)``, naming alpha and lr too where ``settings`` have several."""
    where = ["logit matching"] if st.get("loss") == "logit-mse" else [f"T={st['t']:g}"] if st["t"] is not None else []
    where += [f"{k}={st[k]:g}" for k in ("alpha", "lr") if len({x[k] for x in settings}) > 1 and st[k] is not None]
    n = st["n"]
    return (", ".join(where) + ": " if where else "") + (
        f"{st['mean']:.0f}" if n == 1 else f"{st['mean']:.1f} ± {st['std']:.1f} ({n} seeds)")


def seed_summary(runs: list[dict[str, Any]]) -> list[str]:
    """Where a setting was trained with several seeds: its mean test errors and their spread (the
    lines of a markdown table; none when every setting has one seed)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        key = (r["group"], r["student"], r["inputs"], _t_cell(r), r["alpha"], r["lr"])
        groups.setdefault(key, []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return []
    out = ["", "Over seeds (test errors):", "",
           "| runs in | student | inputs | T | alpha | lr | seeds | mean | std | min-max |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (group, student, inputs, t, alpha, lr), rs in groups.items():
        errs = [r["test_errors"] for r in rs if r["test_errors"] is not None and not r["diverged"]]
        if not errs:
            continue
        mean, std = _mean_std(errs)
        out.append(f"| {group} | {student} | {inputs} | {t} | {alpha:g} | {_fmt(lr, 'g')} | {len(errs)} | {mean:.1f} | "
                   f"{_fmt(std, '.1f')} | {min(errs)}-{max(errs)} |")
    return out


def evaluation_table(paths: list[str]) -> list[str]:
    """The markdown lines for ``kdcache evaluate --json`` files: one row each, with the errors on every
    class any of them biases (the omitted-class correction, before and after)."""
    evals = []
    for path in paths:
        try:
            evals.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise KdcacheError(f"{{param:evaluation}} {path}: cannot be read as kdcache evaluate JSON ({e})") from None
    focus = sorted({int(c) for e in evals for c in e.get("class_bias", {})}
                   | {int(t["class"]) for e in evals for t in e.get("tuned", [])})
    head = "| model | dataset | class bias | test errors | accuracy |" + "".join(f" errors on {c} |" for c in focus)
    lines = ["", "Evaluations (kdcache evaluate):", "", head, "|" + "---|" * (5 + len(focus))]
    for e in evals:
        biases = {int(c): b for c, b in e.get("class_bias", {}).items()} | {int(t["class"]): t["bias"]
                                                                         for t in e.get("tuned", [])}
        bias = ", ".join(f"{c}: {b:+g}" for c, b in sorted(biases.items())) or "-"
        if e.get("tuned"):
            bias += f" (chosen on {e['tuned'][0]['tune_samples']} held-out rows)"
        per = e.get("errors_by_class") or []
        n = e.get("samples_by_class") or []
        cells = "".join(f" {per[c]}/{n[c]} |" if c < len(per) else " - |" for c in focus)
        lines.append(f"| {e['model']} | {e['dataset']} | {bias} | {_fmt(e.get('eval_errors'), 'd')} | "
                     f"{_fmt(e.get('eval_accuracy'), '.4f')} |{cells}")
    return lines


def plot(runs: list[dict[str, Any]], path: str) -> bool:
    """Test error against temperature, one line per student architecture; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["test_errors"] is not None and not r["diverged"]:
            groups.setdefault(r["group"], []).append(r)
    several = len({r["student"] for r in runs}) < len(groups)  # then a line is named by its directory too
    styles = iter([":", "--", "-.", (0, (1, 3))] * 8)
    for group, rs in groups.items():
        name = rs[0]["student"] + (f" ({Path(group).name})" if several else "")
        distilled = [r for r in rs if r["distilled"] and r["temperature"] is not None]
        lines = sorted({(r["alpha"], r["lr"]) for r in distilled}, key=lambda k: (k[0], k[1] or 0))
        for alpha, lr in lines:  # a line per alpha and lr, over T
            pts = _by_setting([r for r in distilled if (r["alpha"], r["lr"]) == (alpha, lr)])
            ax.errorbar([p["t"] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] or 0 for p in pts],
                        marker="o", capsize=3,
                        label=name + "".join(f", {k} {v:g}" for k, v, i in (("alpha", alpha, 0), ("lr", lr, 1))
                                             if v is not None and len({x[i] for x in lines}) > 1)
                        + (f", mean ± std of {pts[0]['n']} seeds" if pts[0]["n"] > 1 else ""))
        for alpha, lr in sorted({(r["alpha"], r["lr"]) for r in rs if r.get("soft_loss") == "logit-mse"
                                 and r["distilled"]}, key=lambda k: (k[0], k[1] or 0)):  # no T: a level
            errs = [r["test_errors"] for r in rs
                    if r.get("soft_loss") == "logit-mse" and (r["alpha"], r["lr"]) == (alpha, lr)]
            ax.axhline(_mean_std(errs)[0], linestyle=next(styles), linewidth=1, color="tab:red",
                       label=f"{name}, logit matching" + (f", mean of {len(errs)} seeds" if len(errs) > 1 else ""))
        alone = [r for r in rs if not r["distilled"]]
        if alone:  # a level: the mean over its seeds
            teacher = alone[0].get("role") == "teacher"
            ax.axhline(_mean_std([r["test_errors"] for r in alone])[0], linestyle=next(styles), linewidth=1,
                       color="black" if teacher else "grey",
                       label=f"teacher {alone[0]['student']}" if teacher else f"{name} without distillation")
    ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test errors")
    ax.set_title("Distilled students: test error against temperature")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(dirs: list[str], out: str | None, plot_path: str | None, roles: dict[str, list[str]] | None = None,
                 paper: str | None = None, notes: list[str] | None = None, evaluations: list[str] | None = None) -> str:
    runs = collect_runs(dirs)
    assign_roles(runs, roles)
    text = "# kdcache report\n\n" + "".join(f"{n.strip()}\n\n" for n in notes or []) + markdown(runs, roles, paper)
    if evaluations:
        text += "\n" + "\n".join(evaluation_table(evaluations))
    text += "\n"
    if plot_path:
        if plot(runs, plot_path):
            text += f"\n![test error against temperature]({Path(plot_path).name})\n"
        else:
            text += "\n(no plot: matplotlib is not installed; `pip install 'kdcache[plot]'` adds it)\n"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        doc = report_json(runs, paper, notes)
        if evaluations:
            doc["evaluations"] = [json.loads(Path(e).read_text()) for e in evaluations]
        Path(out).with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    return text
