"""The paper's whole story on a CPU, offline, in minutes.

1. Build a tiny homologous family (``utils.toy_family``): a LLaMA-architecture model pre-trained on a generated
   corpus holding the raw material of two skills (adding a one-digit number, reversing digits), a short
   instruction-tuning stage on generic tasks with a few skill questions (the *base*), and one SFT specialist per
   skill (HF ``Trainer``, same learning rate and steps), all answering GSM8K-style ``... The answer is: N``.
2. DARE each specialist at drop rates 0 / 0.5 / 0.9 / 0.99, plus DropOnly and magnitude pruning at 0.9
   (``model_merging_methods.streaming.stream_mask_model``), and evaluate it on its own skill.
3. Merge the specialists with average, task arithmetic, TIES and DARE + each of them
   (``model_merging_methods.streaming.stream_merge``) and evaluate every model on every skill.
4. Print the tables, write them as JSON / CSV / Markdown, plot accuracy against drop rate (the paper's Figure 1a),
   the skill-by-model matrix of the merges and the |δ| histograms, with the delta statistics of each specialist.

Evaluation: greedy generation with ``utils.generation_backends.HFBackend`` and the GSM8K answer extraction of
``utils.evaluate_llms_utils`` on held-out questions that occur in no training data.

Models and evaluation results are cached under ``--output_dir`` (default ``./quickstart_runs``) in folders
named by a hash of their settings: a second run only recomputes what changed.

    python quickstart.py                 # full size (under 10 minutes on 2 idle cores)
    python quickstart.py --size ci       # reduced size, about a minute (what CI runs)
    python quickstart.py --set sft_lr=3e-5   # change one family setting: only the specialists are retrained
    python quickstart.py --suite glue    # the encoder story instead (``utils.glue_quickstart``, docs/glue.md)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from utils.cli import UserError, check_rate, run_main

RESULTS_NAME = "results.json"
SUITES = ("llm", "glue")  # the decoder toy (this module) and the encoder story (utils.glue_quickstart)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--suite",
        choices=SUITES,
        default="llm",
        help="llm: this toy of decoders (default); glue: the offline GLUE story of encoders, whose own flags "
        "follow (python quickstart.py --suite glue --help)",
    )
    p.add_argument(
        "--output_dir", default="./quickstart_runs", help="models, cache, tables and plots go here"
    )
    p.add_argument(
        "--size", default="full", choices=["full", "ci"], help="family size preset (ci: reduced, fast)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data, the training and the family: one point of the experiment (docs/quickstart.md "
        "reports seeds 0-4; benchmarks/quickstart_grid.py runs such a grid)",
    )
    p.add_argument(
        "--drop_rates", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.99], help="DARE drop rates"
    )
    p.add_argument(
        "--ablation_rate", type=float, default=0.9, help="drop rate of DropOnly and magnitude pruning"
    )
    p.add_argument(
        "--mask_seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the random DARE/DropOnly masks (default: 0 1 2 at full size, 0 at ci size)",
    )
    p.add_argument(
        "--merge_drop_rates",
        nargs="+",
        default=["auto", "0.9"],
        help="DARE drop rates used before merging (one DARE + X merge per rate); 'auto' = the largest of "
        "--drop_rates at which DARE keeps >= 95%% of every specialist's accuracy (default: auto 0.9)",
    )
    p.add_argument(
        "--scaling_coefficient",
        type=float,
        default=1.0,
        help="λ of task arithmetic and TIES (and of their DARE versions)",
    )
    p.add_argument("--param_value_mask_rate", type=float, default=0.8, help="TIES trim rate")
    p.add_argument("--eval_batch_size", type=int, default=128, help="generation batch size")
    p.add_argument(
        "--num_eval_items", type=int, default=None, help="held-out questions per skill (preset default)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a family setting of utils.toy_family.FamilyConfig (VALUE in JSON, e.g. --set sft_lr=3e-5, "
        "--set skill_weights=null); only the stages that depend on it are rebuilt",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the cores not already busy with other processes, by the 1-minute load "
        "average; oversubscribed cores slow tiny-model training down many times); with 2 or more, the specialists "
        "train side by side, one process each (the same weights as in sequence)",
    )
    p.add_argument(
        "--keep_models", action="store_true", help="keep the DARE'd models (merged models are kept)"
    )
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    return p


# ---------------------------------------------------------------------------------------------------------------


def default_threads() -> int:
    """torch's default thread count, less the cores other processes keep busy (1-minute load average), at least 1.

    With tiny models every step is a handful of short parallel regions; when a thread's core is taken by another
    process the others wait for it, and a step takes many times longer than on one thread (measured here: 2 threads
    on 2 shared cores ran 5-15x slower than 1 thread)."""
    import torch

    n = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform
        return n
    return max(1, min(n, (os.cpu_count() or n) - int(busy + 0.25)))  # a core counts as busy from 0.75


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` strings → a dict; VALUE is JSON (lists become tuples), or a plain string."""
    from utils.toy_family import FamilyConfig

    fields = {f.name for f in dataclasses.fields(FamilyConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise UserError(
                f"--set expects FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}; got {item!r}"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        out[key] = value
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Run:
    """One quickstart run: the family, an evaluation cache and the derived (DARE'd / merged) models."""

    def __init__(self, args: argparse.Namespace, cfg, family, out: Path):
        from utils.toy_family import eval_items

        self.args, self.cfg, self.family, self.out = args, cfg, family, out
        self.items = {s: eval_items(cfg, s) for s in cfg.skills}
        self.cache_dir = out / "cache" / "eval"
        self.derived_dir = out / "derived"
        self.n_evaluated = 0
        self.n_cached = 0

    def eval_key(self, model_key: str, skills: list[str]) -> str:
        from utils.toy_family import EVAL_VERSION

        c = self.cfg
        return _digest(
            {
                "model": model_key,
                "skills": skills,
                "eval_version": EVAL_VERSION,
                "seed": c.seed,
                "difficulty": c.difficulty,
                "num_eval_items": c.num_eval_items,
                "max_new_tokens": c.max_new_tokens,
            }
        )

    def cached(self, model_key: str, skills: list[str]) -> dict | None:
        path = self.cache_dir / f"{self.eval_key(model_key, skills)}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))["results"]
            except (json.JSONDecodeError, KeyError):
                return None
        return None

    def evaluate(self, model_key: str, model_path: Path, skills: list[str], label: str) -> dict[str, dict]:
        """Accuracy of one model on ``skills`` (from the cache when this model and settings were seen before)."""
        from utils.results_io import write_json
        from utils.toy_family import evaluate_on_skills

        hit = self.cached(model_key, skills)
        if hit is not None:
            self.n_cached += 1
            return hit
        res = evaluate_on_skills(
            model_path,
            {s: self.items[s] for s in skills},
            self.cfg.max_new_tokens,
            batch_size=self.args.eval_batch_size,
        )
        self.n_evaluated += 1
        write_json(
            self.cache_dir / f"{self.eval_key(model_key, skills)}.json",
            {"model": label, "model_key": model_key, "results": res},
        )
        return res


def _family_keys(cfg, family) -> dict[str, str]:
    from utils.toy_family import stage_key

    keys = {"pre-trained": f"pretrained-{stage_key(cfg, 'pretrained')}", "base": family.base.name}
    for skill, path in family.specialists.items():
        keys[f"{skill} specialist"] = path.name
    return keys


def _dare_jobs(args, cfg) -> list[dict[str, Any]]:
    seeds = args.mask_seeds
    jobs = []
    for skill in cfg.skills:
        for rate in args.drop_rates:
            if rate == 0.0:
                continue
            for seed in seeds:
                jobs.append(
                    dict(skill=skill, variant="DARE", rate=rate, rescale=True, strategy="random", seed=seed)
                )
        for seed in seeds:
            jobs.append(
                dict(
                    skill=skill,
                    variant="DropOnly",
                    rate=args.ablation_rate,
                    rescale=False,
                    strategy="random",
                    seed=seed,
                )
            )
        jobs.append(
            dict(
                skill=skill,
                variant="magnitude",
                rate=args.ablation_rate,
                rescale=False,
                strategy="magnitude",
                seed=0,
            )
        )
    return jobs


def _merge_jobs(args, merge_rates: list[float]) -> list[dict[str, Any]]:
    lam, trim = args.scaling_coefficient, args.param_value_mask_rate
    plain = [
        ("average", dict(merging_method_name="average_merging")),
        (
            f"task arithmetic (λ={lam:g})",
            dict(merging_method_name="task_arithmetic", scaling_coefficient=lam),
        ),
        (
            f"TIES (trim {trim:g}, λ={lam:g})",
            dict(merging_method_name="ties_merging", scaling_coefficient=lam, param_value_mask_rate=trim),
        ),
    ]
    jobs = [dict(label=label, kwargs=kw) for label, kw in plain]
    for p in merge_rates:
        for label, kw in plain:
            dare_kw = dict(
                kw,
                merging_method_name="mask_merging",
                mask_apply_method=kw["merging_method_name"],
                weight_mask_rates=p,
                use_weight_rescale=True,
                mask_strategy="random",
                seed=0,
            )
            jobs.append(dict(label=f"DARE p={p:g} + {label}", kwargs=dare_kw))
    return jobs


def resolve_merge_rates(requested: list[str], dare_rows: list[dict[str, Any]]) -> list[float]:
    """The DARE rates for merging: numbers as given; ``auto`` = the largest DARE rate that keeps >= 95% of every
    specialist's accuracy (0 when none does, in which case no DARE merge is added for it). Sorted, no repeats."""
    from utils.results_report import keeps_fraction_up_to

    rates: set[float] = set()
    for item in requested:
        if item == "auto":
            limits = [keeps_fraction_up_to(row, 0.95) for row in dare_rows]
            auto = min((x for x in limits if x is not None), default=0.0)
            if auto > 0:
                rates.add(auto)
        else:
            rates.add(float(item))
    return sorted(rates)


@contextlib.contextmanager
def _streaming_log(path: Path):
    """Send the streaming engine's per-call chatter (its summary line, homology statistics and warnings, inner
    progress bars) to a log file; the quickstart prints its own tables and delta verdicts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("model_merging_methods.streaming")
    old_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(path, "a", encoding="utf-8") as f, contextlib.redirect_stderr(f):
            yield
    finally:
        logger.setLevel(old_level)


def _delta_reports(family, cfg):
    """Delta statistics of each specialist against the base (streamed by the checkpoint reader)."""
    from utils.delta_analysis import stream_delta_statistics

    return {
        s: stream_delta_statistics(str(family.base), str(family.specialists[s]), progress=False)[0]
        for s in cfg.skills
    }


# A specialist below this accuracy on its own skill did not learn it: the family is outside the toy's regime.
WEAK_SPECIALIST_BELOW = 0.5


def weak_specialist_warnings(family: list[dict[str, Any]], skills: list[str]) -> list[str]:
    """One warning line per specialist whose accuracy on its own skill is below :data:`WEAK_SPECIALIST_BELOW`."""
    rows = {r["model"]: r for r in family}
    lines = []
    for s in skills:
        acc, base = rows[f"{s} specialist"][s], rows["base"][s]
        if acc < WEAK_SPECIALIST_BELOW:
            lines.append(
                f"warning: the {s} specialist learned its skill only weakly ({acc:.1%}, base {base:.1%}): this "
                "family is outside the range the recipe was checked on (seeds 0-4 on an AMD EPYC: every specialist "
                ">= 99%; docs/quickstart.md), so its DARE and merge numbers say little; please report it with your "
                "CPU (lscpu), torch version, --seed and --threads"
            )
    return lines


def reading(tables: dict[str, list[dict[str, Any]]], skills: list[str]) -> list[str]:
    """Plain-language lines read off the tables (no judgement added): a warning for a specialist that did not learn
    its skill, how much of each specialist's accuracy DARE and the ablations keep, and how much of each
    specialist's accuracy each merge keeps."""
    lines = weak_specialist_warnings(tables["family"], skills)
    for row, ret in zip(tables["dare"], tables["dare_retention"]):
        kept = ", ".join(
            f"{k} {v:.0%}"
            for k, v in ret.items()
            if k.startswith(("DARE p=", "DropOnly", "magnitude")) and v is not None
        )
        limit = ret.get("DARE keeps >=95% up to p")
        lines.append(
            f"{row['model']} ({row['p=0']:.1%} on {row['dataset']}): DARE keeps >= 95% of it up to p = {limit}; "
            f"share kept: {kept or 'n/a (the specialist scores 0)'}"
        )
    merges = [r for r in tables["merges_relative_to_specialist"] if not r["model"].endswith("specialist")]
    merges = [r for r in merges if r["model"] != "base"]
    for r in merges:
        shares = [r[f"{s} / specialist"] for s in skills]
        lines.append(
            f"{r['model']}: "
            + ", ".join(f"{s} {v:.0%}" if v is not None else f"{s} n/a" for s, v in zip(skills, shares))
            + " of the specialist's accuracy"
        )
    scored = [r for r in merges if all(r[f"{s} / specialist"] is not None for s in skills)]
    if scored:
        best = max(scored, key=lambda r: min(r[f"{s} / specialist"] for s in skills))
        worst_share = min(best[f"{s} / specialist"] for s in skills)
        lines.append(
            f"best merge by its weakest skill: {best['model']} (keeps >= {worst_share:.0%} on every skill)"
        )
    return lines


def run_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from model_merging_methods.paths import is_toolkit_output, remove_toolkit_output
    from model_merging_methods.streaming import stream_mask_model, stream_merge
    from utils.delta_analysis import DARE_BREAKS_ABOVE, DARE_WORKS_BELOW, dare_regime_verdict
    from utils.results_io import markdown_table, round_floats, write_json, write_table
    from utils.results_report import (
        QUICKSTART_SCHEMA,
        dare_table,
        keeps_fraction_up_to,
        merge_table,
        retention_table,
    )
    from utils.run_settings import run_settings
    from utils.toy_family import FAMILY_VERSION, build_family, family_config

    t_start = time.time()
    timings: dict[str, float] = {}
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.num_eval_items is not None:
        overrides["num_eval_items"] = args.num_eval_items
    overrides.update(parse_overrides(args.overrides))
    cfg = family_config(args.size, **overrides)
    if args.mask_seeds is None:
        args.mask_seeds = [0, 1, 2] if args.size == "full" else [0]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"quickstart ({args.size} size) -> {out.resolve()}")

    # 1. the family ------------------------------------------------------------------------------------------
    t0 = time.time()
    # the specialists train side by side, one process per thread (the models are the same as in sequence)
    family = build_family(cfg, out / "models", workers=torch.get_num_threads())
    timings["build family"] = time.time() - t0
    run = Run(args, cfg, family, out)
    keys = _family_keys(cfg, family)
    paths = {
        "pre-trained": family.pretrained,
        "base": family.base,
        **{f"{s} specialist": p for s, p in family.specialists.items()},
    }
    if cfg.instruct_steps == 0:
        paths.pop("pre-trained")
    records: list[dict[str, Any]] = []

    t0 = time.time()
    family_res: dict[str, dict] = {}
    for name in tqdm(list(paths), desc="evaluating the family", unit="model"):
        family_res[name] = run.evaluate(keys[name], paths[name], list(cfg.skills), name)
        for skill, r in family_res[name].items():
            records.append(
                {
                    "kind": "model",
                    "model": name,
                    "dataset": skill,
                    "metric": "accuracy",
                    "value": r["accuracy"],
                }
            )
    for skill in cfg.skills:
        r = family_res[f"{skill} specialist"][skill]
        records.append(
            {
                "kind": "dare",
                "model": f"{skill} specialist",
                "dataset": skill,
                "metric": "accuracy",
                "value": r["accuracy"],
                "drop_rate": 0.0,
                "variant": "fine-tuned",
                "seed": None,
            }
        )
    timings["evaluate family"] = time.time() - t0

    # deltas ---------------------------------------------------------------------------------------------------
    t0 = time.time()
    reports = _delta_reports(family, cfg)
    delta_rows = []
    for skill, rep in reports.items():
        s = rep.overall.summary()
        delta_rows.append(
            {
                "specialist": f"{skill} specialist",
                "max_abs": s["max_abs"],
                "q99_abs": s["q99_abs"],
                "q99.9_abs": s["q99.9_abs"],
                "mean_abs": s["mean_abs"],
                "numel": s["numel"],
                "verdict": dare_regime_verdict(s).split(":")[0],
            }
        )
    timings["delta statistics"] = time.time() - t0

    log_path = out / "logs" / "streaming.log"

    # 2. DARE ----------------------------------------------------------------------------------------------------
    t0 = time.time()
    jobs = _dare_jobs(args, cfg)
    for job in tqdm(jobs, desc="DARE / DropOnly / magnitude", unit="model"):
        skill = job["skill"]
        params = dict(
            weight_mask_rate=job["rate"],
            use_weight_rescale=job["rescale"],
            mask_strategy=job["strategy"],
            seed=job["seed"],
        )
        mkey = "dare-" + _digest({"base": keys["base"], "ft": keys[f"{skill} specialist"], **params})
        res = run.cached(mkey, [skill])
        if res is None:
            folder = run.derived_dir / mkey
            if not (folder / "config.json").is_file():
                with _streaming_log(log_path):
                    stream_mask_model(
                        str(family.base),
                        str(family.specialists[skill]),
                        str(folder),
                        overwrite=True,
                        **params,
                    )
            res = run.evaluate(mkey, folder, [skill], f"{job['variant']} {job['rate']} {skill}")
            if not args.keep_models and is_toolkit_output(folder):
                remove_toolkit_output(folder)  # only ever a folder the toolkit wrote
        else:
            run.n_cached += 1
        records.append(
            {
                "kind": "dare",
                "model": f"{skill} specialist",
                "dataset": skill,
                "metric": "accuracy",
                "value": res[skill]["accuracy"],
                "drop_rate": job["rate"],
                "variant": job["variant"],
                "seed": job["seed"],
            }
        )
    timings["DARE"] = time.time() - t0

    # 3. merges --------------------------------------------------------------------------------------------------
    t0 = time.time()
    group = "+".join(cfg.skills)
    ft_paths = [str(family.specialists[s]) for s in cfg.skills]
    merge_rates = resolve_merge_rates(args.merge_drop_rates, dare_table(records))
    for job in tqdm(_merge_jobs(args, merge_rates), desc="merging", unit="merge"):
        mkey = "merge-" + _digest(
            {"base": keys["base"], "fts": [keys[f"{s} specialist"] for s in cfg.skills], **job["kwargs"]}
        )
        res = run.cached(mkey, list(cfg.skills))
        if res is None:
            folder = run.derived_dir / mkey
            if not (folder / "config.json").is_file():
                with _streaming_log(log_path):
                    stream_merge(str(family.base), ft_paths, str(folder), overwrite=True, **job["kwargs"])
            res = run.evaluate(mkey, folder, list(cfg.skills), job["label"])
        else:
            run.n_cached += 1
        for skill in cfg.skills:
            records.append(
                {
                    "kind": "merge",
                    "model": group,
                    "method": job["label"],
                    "dataset": skill,
                    "metric": "accuracy",
                    "value": res[skill]["accuracy"],
                }
            )
    timings["merges"] = time.time() - t0

    # 4. tables ----------------------------------------------------------------------------------------------------
    family_rows = [
        {"model": name, **{s: family_res[name][s]["accuracy"] for s in cfg.skills}} for name in paths
    ]
    dare_rows = dare_table(records)
    retention_rows = retention_table(dare_rows)
    for row, ret in zip(dare_rows, retention_rows):
        ret["DARE keeps >=95% up to p"] = keeps_fraction_up_to(row, 0.95)
    refs = [r for r in records if r["kind"] == "model" and r["model"] != "pre-trained"]
    merge_rows, _ = merge_table(records, references=refs)
    rel_rows = []
    for row in merge_rows:
        rel = {"model": row["model"]}
        for s in cfg.skills:
            spec = family_res[f"{s} specialist"][s]["accuracy"]
            rel[f"{s} / specialist"] = (row[s] / spec) if (row[s] is not None and spec) else None
        rel_rows.append(rel)
    tables = {
        "family": family_rows,
        "dare": dare_rows,
        "dare_retention": retention_rows,
        "merges": merge_rows,
        "merges_relative_to_specialist": rel_rows,
        "deltas": delta_rows,
    }
    tdir = out / "tables"
    for name, rows in tables.items():
        write_table(round_floats(rows, 4), tdir / f"{name}.csv", tdir / f"{name}.md")

    # plots
    plots: dict[str, str] = {}
    if not args.no_plots:
        from utils.plotting import plot_delta_histograms, plot_drop_rate_curves, plot_merge_matrix

        curves, markers, refs_lines = {}, {}, {}
        for row in dare_rows:
            label = f"{row['model']} on {row['dataset']}"
            curves[label] = {
                0.0: row["p=0"],
                **{
                    float(k.split("p=")[1]): v
                    for k, v in row.items()
                    if k.startswith("DARE p=") and v is not None
                },
            }
            markers[label] = {
                k: v for k, v in row.items() if k.startswith(("DropOnly", "magnitude")) and v is not None
            }
            refs_lines[f"base on {row['dataset']}"] = family_res["base"][row["dataset"]]["accuracy"]
        plots["drop_rate"] = str(
            plot_drop_rate_curves(
                curves,
                out / "plots" / "dare_drop_rate.png",
                markers=markers,
                references=refs_lines,
                title=f"DARE on the toy specialists (mean of {len(args.mask_seeds)} mask seed(s))",
            )
        )
        plots["merge_matrix"] = str(
            plot_merge_matrix(
                [[row[s] for s in cfg.skills] for row in merge_rows],
                [row["model"] for row in merge_rows],
                list(cfg.skills),
                out / "plots" / "merge_matrix.png",
                title="Accuracy of each model on each skill",
            )
        )
        plots["delta_hist"] = str(
            plot_delta_histograms(
                {f"{s} specialist": rep.overall.bins() for s, rep in reports.items()},
                out / "plots" / "delta_hist.png",
                title="|δ| of each specialist against the base",
                vlines={f"~{DARE_WORKS_BELOW}": DARE_WORKS_BELOW, f"~{DARE_BREAKS_ABOVE}": DARE_BREAKS_ABOVE},
            )
        )

    read = reading(tables, list(cfg.skills))
    timings["total"] = time.time() - t_start
    result = {
        "schema": QUICKSTART_SCHEMA,
        "family_version": FAMILY_VERSION,
        "size": args.size,
        "config": cfg.to_dict(),
        # every flag, the versions and the git commit (utils.run_settings); each record holds its own settings
        "settings": run_settings(
            args, script="quickstart.py", kind="quickstart", size=args.size, family_version=FAMILY_VERSION
        ),
        "models": {k: str(v) for k, v in paths.items()},
        "training": family.info,
        "delta_statistics": {s: rep.to_dict() | {"per_tensor": None} for s, rep in reports.items()},
        "merge_drop_rates_used": merge_rates,
        "tables": tables,
        "reading": read,
        "records": records,
        "plots": plots,
        "timings_s": timings,
        "evaluations_run": run.n_evaluated,
        "evaluations_cached": run.n_cached,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    write_json(out / RESULTS_NAME, {**round_floats(result, 6), "settings": result["settings"]})  # exact flags

    # print
    print()
    titles = {
        "family": "Accuracy of the family on each skill (held-out questions, exact answer)",
        "dare": "DARE on each specialist, own skill (accuracy; DropOnly and magnitude pruning at "
        f"{args.ablation_rate:g}; mean of {len(args.mask_seeds)} mask seed(s))",
        "dare_retention": "Share of each specialist's accuracy kept",
        "merges": "Merged models on every skill (accuracy)",
        "merges_relative_to_specialist": "Merged models relative to the specialist of each skill",
        "deltas": "Delta parameters of each specialist (against the base)",
    }
    for name, rows in tables.items():
        print(f"## {titles[name]}\n")
        print(markdown_table(round_floats(rows, 4)))
    print("## Reading\n")
    print("\n".join(f"- {line}" for line in read) + "\n")
    print(
        f"evaluations: {run.n_evaluated} run, {run.n_cached} from cache; wall time {timings['total']:.0f} s"
    )
    print(
        f"tables: {tdir}/*.md|csv, results: {out / RESULTS_NAME}"
        + (f", plots: {out / 'plots'}" if plots else "")
    )
    return result


def split_suite(argv: list[str]) -> tuple[str, list[str]]:
    """``--suite`` and the other arguments (``--suite glue`` hands them all to ``utils.glue_quickstart``)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", choices=SUITES, default="llm")
    known, rest = pre.parse_known_args(argv)
    return known.suite, rest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import sys

    suite, rest = split_suite(list(sys.argv[1:] if argv is None else argv))
    if suite == "glue":
        from utils import glue_quickstart

        return glue_quickstart.main(rest)
    args = build_parser().parse_args(rest)
    for r in args.drop_rates:
        check_rate("--drop_rates", r)
    for name in ("ablation_rate", "param_value_mask_rate"):
        check_rate(f"--{name}", getattr(args, name))
    for r in args.merge_drop_rates:
        if r != "auto":
            try:
                check_rate("--merge_drop_rates", float(r))
            except ValueError as exc:
                raise UserError(f"--merge_drop_rates takes numbers in [0, 1] or 'auto', got {r!r}") from exc
    if args.eval_batch_size < 1:
        raise UserError("--eval_batch_size must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.num_eval_items is not None and args.num_eval_items < 1:
        raise UserError("--num_eval_items must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads())
    try:
        return run_quickstart(args)
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting as it was (tests call main in-process)


if __name__ == "__main__":
    run_main(main)
