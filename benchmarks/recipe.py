"""Token-efficiency of the training recipes: validation perplexity and KL against training
tokens, the new recipe (readout fit -> attention-output transfer -> distillation) against the
paper's (matrix mixing -> hidden-to-hidden -> distillation), and the six tasks for the best.

Every step is resumable and each writes into its own run folder under outputs/, so the whole
measurement is done in parts across sessions:

    python benchmarks/recipe.py run --arch deltanet --recipe at       # train (resumes)
    python benchmarks/recipe.py eval --arch deltanet --recipe at --limit 500   # six tasks (resumes)
    python benchmarks/recipe.py eval --teacher --limit 500            # the teacher, same documents
    python benchmarks/recipe.py longval --arch deltanet --recipe at   # 512-token context (a window's honesty)
    python benchmarks/recipe.py report                                # docs/recipe.md + .json

Recipes are overrides of the ``cpu-recipe`` preset (params/presets/cpu-recipe.yaml).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
PRESET = "cpu-recipe"

# name -> (overrides of the cpu-recipe preset, what it is)
RECIPES: dict[str, tuple[dict, str]] = {
    "at": ({}, "QKV copy, readout fit, attention transfer (output, all mixer parameters), distillation"),
    "at-heads": ({"at_target": "heads"}, "as at, regressing per-head outputs before o_proj"),
    "at-gates": ({"at_train": "gates"}, "as at, training only gates / feature maps (q/k/v/o frozen)"),
    "at-lora": ({"at_train": "lora"}, "as at, gates + peft LoRA (rank 8) on q/k/v/o"),
    "at-kl": ({"kd_alpha": 1.0, "stage3_train": "all"}, "as at (stage 3 CE + KL, all parameters)"),
    # stage-3 choices, each branched from the `at` run's finished stage 0 (run --from at)
    "at-s3lora": ({"stage3_train": "lora"}, "as at, stage 3 trains gates + peft LoRA (rank 8) on q/k/v/o only"),
    "at-s3mixers": ({"stage3_train": "mixers"}, "as at, stage 3 trains the mixers only"),
    "at-s3kl": ({"kd_ce_weight": 0.0}, "as at, stage 3 on the KL alone (no next-token CE)"),
    # shorter transfer, longer distillation (stage 3 bought KL far more cheaply per token in `at`),
    # at `at`'s distillation rate: 3e-4 diverged here (KL 1.58 -> 3.39 and grad norm 228 by step 24
    # of 64 on the mix, outputs/diverged/),
    # on the mixed corpus (SOTU + Wikipedia train articles + FAQ) so that the student is not
    # fitted to one narrow domain; validation is the mix's own held-out split, wiki-val stays OOD
    "mix-kd": ({"corpus": "mix", "stage0_tokens": 65536, "stage3_tokens": 163840, "stage3_lr": 1e-4,
                "eval_every_tokens": 32768},
               "QKV copy, readout fit, 64K transfer, 160K distillation (lr 1e-4), on the mixed corpus"),
    "mix-kd-w64": ({"corpus": "mix", "stage0_tokens": 65536, "stage3_tokens": 163840, "stage3_lr": 1e-4,
                    "eval_every_tokens": 32768, "hybrid_window": 64},
                   "as mix-kd, with a 64-token softmax window (+4 sinks) beside the linear branch"),
    # the same stage 0 with a shorter distillation (branched: run --from mix-kd), and stage 0 alone
    "mix-kd64": ({"corpus": "mix", "stage0_tokens": 65536, "stage3_tokens": 65536, "stage3_lr": 1e-4,
                  "eval_every_tokens": 32768},
                 "as mix-kd, 64K distillation"),
    "mix-at": ({"corpus": "mix", "stage0_tokens": 65536, "eval_every_tokens": 32768, "distill": False},
               "mix-kd's stage 0 alone: QKV copy, readout fit, 64K transfer on the mixed corpus, no distillation"),
    # does the gate initialisation from the teacher's attention distances (linearize.gate_init),
    # which lowers the KL at zero tokens (docs/gate_init.md), still count after 64K of transfer?
    # mix-at for gla is the grid's gla stage 0 (same preset values, seed and data): its 64K point
    # is the baseline
    "mix-at-gi": ({"corpus": "mix", "stage0_tokens": 65536, "eval_every_tokens": 32768, "distill": False,
                   "gate_init_tokens": 8192},
                  "mix-at with the decay gates set from the teacher's attention distances (8K tokens) first"),
    # stage-3 choices (issue 13, item 3), each 16K tokens of distillation at 1e-4 branched from
    # mix-at-gi's finished stage 0 (run --from mix-at-gi): CE + KL on all parameters (the grid's
    # stage 3), the KL alone, and peft LoRA (rank 8) on q/k/v/o + the mixers' gates
    **{name: ({"corpus": "mix", "stage0_tokens": 65536, "eval_every_tokens": 32768, "gate_init_tokens": 8192,
               "stage3_tokens": 16384, "stage3_lr": 1e-4, **extra}, what)
       for name, extra, what in (
           ("mix-gi-kd", {}, "mix-at-gi, then 16K distillation (CE + KL, all parameters, lr 1e-4)"),
           ("mix-gi-kl", {"kd_ce_weight": 0.0}, "as mix-gi-kd on the KL alone (no next-token CE)"),
           ("mix-gi-lora", {"stage3_train": "lora"}, "as mix-gi-kd training peft LoRA (rank 8) on q/k/v/o "
                                                     "and the mixers' gates only"),
           # the speed lever of docs/speed_notes.md (a stage-3 step at 0.74x the teacher's fwd+bwd
           # against 0.59x for all parameters): what does it cost in KL?
           ("mix-gi-mixers", {"stage3_train": "mixers"}, "as mix-gi-kd training the mixers only"))},
    "mix-at-w64": ({"corpus": "mix", "stage0_tokens": 65536, "eval_every_tokens": 32768, "distill": False,
                    "hybrid_window": 64}, "mix-at with the 64-token softmax window"),
    # mix-at-w64 with a gate that can move: at the stage's 1e-3 the mix logit moves 0.06 at most in
    # 64 steps (the gates of mix-at-w64 ended within 0.0004 of 0.99); at 0.05 it can move ~3
    "mix-at-w64-gate": ({"corpus": "mix", "stage0_tokens": 65536, "eval_every_tokens": 32768, "distill": False,
                         "hybrid_window": 64, "hybrid_mix_lr": 0.05},
                        "mix-at-w64 with the mix's own learning rate 0.05 (the rest at 1e-3)"),
    # the hybrids miss their KL target only at 512 tokens (0.143-0.144 against 0.14), where the
    # 64-token window covers an eighth of a block; trained on 128-token blocks, the linear branch
    # never had to carry more than 64 tokens of context. The same run on 512-token blocks (batch 2:
    # the same tokens per step), validated on 8 of them, under bf16 (docs/recipe.md: no KL cost)
    "mix-at-w64-gate-s512": ({"corpus": "mix", "stage0_tokens": 65536, "eval_every_tokens": 32768, "distill": False,
                              "hybrid_window": 64, "hybrid_mix_lr": 0.05, "seq_len": 512, "batch_size": 2,
                              "val_blocks": 8, "bf16": True},
                             "mix-at-w64-gate on 512-token blocks (batch 2), validated on 8 of them, bf16 autocast"),
    # the control for the hybrids: their learned gates stayed at the 0.99 start, so is what they
    # keep the window's? The 64-token window (+4 sinks) alone, the linear branch weighted 0, the
    # teacher's own q/k/v/o and MLPs, no training: the teacher with its attention cut to a window
    "window-w64": ({"corpus": "mix", "readout_fit_tokens": 0, "attention_transfer": False, "distill": False,
                    "hybrid_window": 64, "hybrid_mix": 1.0, "hybrid_learn_mix": False},
                   "control: the 64-token softmax window (+4 sinks) alone, linear branch off, no training"),
    # the paper's pipeline at the grid recipe cell's 80K tokens (issue 13: paper vs ours at equal
    # tokens): QKV copy, 32K matrix mixing (lr 5e-4, as the grid's mm cells), 32K hidden-to-hidden
    # (1e-3), then the recipe cell's own stage 3 (16K at 1e-4), so the two differ only in what
    # the first 64K tokens do; no readout fit (the paper has none); paired with the grid's cell
    "mix-paper": ({"corpus": "mix", "readout_fit_tokens": 0, "attention_transfer": False, "matrix_mixing": True,
                   "h2h": True, "stage1_tokens": 32768, "stage2_tokens": 32768, "stage1_lr": 5e-4, "stage2_lr": 1e-3,
                   "stage3_tokens": 16384, "stage3_lr": 1e-4, "eval_every_tokens": 32768},
                  "the paper's pipeline at the grid recipe's 80K tokens: QKV copy, 32K matrix mixing, "
                  "32K hidden-to-hidden, 16K distillation (lr 1e-4), mixed corpus"),
    # bf16 autocast for training (issue 13 item 3; issue 14's bf16 lever): on a CPU with AMX the
    # teacher's fwd+bwd runs 1.63x faster in bf16 (docs/speed.md). The same short recipe (32K
    # transfer, 16K distillation, mixed corpus) in float32 and under bf16 autocast for every
    # stage (bf16 is part of every stage's identity, so the pair cannot branch from one stage 0);
    # validation runs in float32 for both
    **{name: ({"corpus": "mix", "stage0_tokens": 32768, "stage3_tokens": 16384, "stage3_lr": 1e-4,
               "eval_every_tokens": 16384, **extra}, what)
       for name, extra, what in (
           ("mix-at32-kd", {}, "32K transfer, 16K distillation (lr 1e-4), mixed corpus, float32: bf16's control"),
           ("mix-at32-kd-bf16", {"bf16": True}, "as mix-at32-kd, every stage under bf16 autocast"),
           # the readout fit on 64 blocks spread over the mix's training split instead of its first
           # 64 (8K consecutive tokens: parts of three documents); a fit on the teacher's own text, whose
           # 64 blocks come from 32 prompts spread over the split, started far closer (gen-at32-kd-bf16)
           ("spread-at32-kd-bf16", {"bf16": True, "fit_spread": True},
            "as mix-at32-kd-bf16, the readout fit on blocks spread over the training split (fit_spread)"),
           # issue 13 item 5, text the teacher generates: every stage (and the readout fit) trains on
           # 64K tokens the teacher samples at temperature 1 from 16-token prompts of the mix's
           # training split (linearize.teacher_text); validated, like its control mix-at32-kd-bf16, on
           # the mix's validation blocks and on wiki-val
           ("gen-at32-kd-bf16", {"bf16": True, "train_corpus": "teacher-text", "teacher_text_tokens": 65536,
                                 "teacher_text_new": 240},
            "as mix-at32-kd-bf16, trained on 64K tokens the teacher sampled itself from 16-token prompts "
            "of the mix (validated on the mix)"))},
    # the pure target at the budget (issue 13: <= 2 hours of 2-core CPU): stage 3 bought KL far more
    # cheaply per token than stage 0 in `at` (0.86 -> 0.67 in 32K), and bf16 autocast halves a
    # step's time at an unchanged KL (mix-at32-kd-bf16): 1.8x `at`'s tokens, most of them distillation,
    # took 64 minutes at 2 threads (docs/recipe.md: the KL flattened near 0.7); on the mixed corpus,
    # whose 1e-4 distillation rate held where 3e-4 diverged
    "mix-long-bf16": ({"corpus": "mix", "stage0_tokens": 196608, "stage3_tokens": 327680, "stage3_lr": 1e-4,
                       "eval_every_tokens": 65536, "bf16": True},
                      "192K transfer, 320K distillation (lr 1e-4), mixed corpus, bf16 autocast: "
                      "the pure target's two-hour attempt"),
    # mix-long-bf16's KL flattened near 0.7 over its last 128K tokens, but stage 3's rate decays
    # linearly to its floor over the stage, so the flattening may be the schedule's, not the
    # student's limit. The same stage 0 (run --from mix-long-bf16: its 192K of transfer, 1602 s)
    # and the same 1e-4 peak, with stage 3 stretched to fill the two hours: 1M tokens in all (the
    # issue's 1M curve point); only the stage's length differs
    "mix-1m-bf16": ({"corpus": "mix", "stage0_tokens": 196608, "stage3_tokens": 851968, "stage3_lr": 1e-4,
                     "eval_every_tokens": 65536, "bf16": True},
                    "mix-long-bf16 with 832K of distillation: 1M tokens in all (run --from mix-long-bf16)"),
    "paper": ({"readout_fit_tokens": 0, "attention_transfer": False, "matrix_mixing": True, "h2h": True,
               "stage1_tokens": 16384, "stage2_tokens": 16384, "stage1_lr": 1e-3, "stage2_lr": 1e-3},
              "the paper's recipe: QKV copy, matrix mixing, hidden-to-hidden, distillation"),
}


def resolve(arch: str, recipe: str, extra: dict | None = None) -> dict:
    from linearize import params as P

    if recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    over = {**RECIPES[recipe][0], "run_name": f"recipe-{recipe}", **(extra or {})}
    return P.resolve(arch, PRESET, over)


def cmd_run(args) -> int:
    import torch

    from linearize.stages import run_pipeline

    torch.set_num_threads(args.threads)
    extra = {}
    for item in args.set:
        import yaml

        key, _, value = item.partition("=")
        extra[key] = yaml.safe_load(value)
    params = resolve(args.arch, args.recipe, extra)
    if args.branch_from:
        branch(Path(args.root) / args.arch, args.branch_from, params["run_name"])
    t = time.perf_counter()
    out = run_pipeline(params, root=args.root)
    print(f"{args.arch}/{params['run_name']}: finished={out['finished']} in {time.perf_counter() - t:.0f} s")
    return 0


def branch(arch_dir: Path, source: str, target: str) -> None:
    """Start run ``target`` from run ``recipe-<source>``'s finished stage 0: copy its conversion,
    stage0/ and the metrics logged up to the end of stage 0. The stage's identity is checked as
    usual when the target runs, so a branch whose stage-0 parameters differ is refused."""
    import shutil

    src, dst = arch_dir / f"recipe-{source}", arch_dir / target
    if dst.exists():
        return  # already branched (a resumed call)
    if not (src / "stage0" / "done.json").exists():
        raise SystemExit(f"{src} has no finished stage 0 to branch from: run --recipe {source} first")
    dst.mkdir(parents=True)
    for sub in ("stage0", "conversion"):
        if (src / sub).exists():
            shutil.copytree(src / sub, dst / sub)
    kept = []
    for line in (src / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("stage") == 3 or str(record.get("after", "")).startswith("stage3"):
            break  # stage 3's first record: what came before is stage 0 (with its throughput and eval)
        kept.append(line)
    (dst / "metrics.jsonl").write_text("\n".join(kept) + "\n")


LONG_SEQ, LONG_BLOCKS = 512, 8  # 4K tokens per set, as the 32 x 128 validation blocks


def cmd_longval(args) -> int:
    """The final student against the teacher on 512-token blocks, of the run's own validation
    split and of wiki-val: at seq 128 a 64-token softmax window covers half of every block, so
    the in-training validation flatters the hybrids; here it covers an eighth."""
    import torch
    import yaml

    from linearize.data import token_blocks
    from linearize.evaluate import load_model
    from linearize.perplexity import perplexity_and_kl
    from linearize.teacher import load_teacher

    torch.set_num_threads(args.threads)
    folder = Path(args.root) / args.arch / f"recipe-{args.recipe}"
    params = yaml.safe_load((folder / "params.yaml").read_text())
    student, tok, label = load_model(folder)
    teacher, _ = load_teacher(params["teacher"])
    out = {"model": label, "seq_len": LONG_SEQ}
    for name, source, split in (("val", params["corpus"], "validation"), ("ood", params.get("ood_corpus") or "wiki-val", "all")):
        blocks = token_blocks(tok, source, LONG_SEQ, split, params["val_fraction"])
        pick = torch.linspace(0, blocks.shape[0] - 1, min(LONG_BLOCKS, blocks.shape[0])).round().long()
        t = time.perf_counter()
        r = perplexity_and_kl(student, teacher, blocks[pick], batch_size=2)
        out[name] = {"corpus": str(source), "ppl": r["perplexity"], "teacher_ppl": r["teacher_perplexity"],
                     "kl": r["kl"], "n_blocks": int(pick.numel()), "wall_s": time.perf_counter() - t}
        print(f"{label} {name} @{LONG_SEQ}: ppl {r['perplexity']:.2f} / teacher {r['teacher_perplexity']:.2f} "
              f"= {r['perplexity'] / r['teacher_perplexity']:.2f}x, KL {r['kl']:.3f}")
    (folder / f"long_val_{LONG_SEQ}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


def _eval_path(folder: Path, limit: int | None) -> Path:
    return folder / f"tasks_{'full' if limit is None else f'limit{limit}'}.json"


def cmd_eval(args) -> int:
    import torch

    from linearize.evaluate import evaluate_tasks, load_model
    from linearize.results import TASKS

    torch.set_num_threads(args.threads)
    limit = None if args.limit in (None, 0) else args.limit
    if args.teacher:
        folder = Path(args.root) / "teacher-recipe"
        source = None
    else:
        folder = Path(args.root) / args.arch / f"recipe-{args.recipe}"
        source = folder
    folder.mkdir(parents=True, exist_ok=True)
    model, tok, label = load_model(source)
    path = _eval_path(folder, limit)
    # one task at a time, each written as it finishes: a session that ends mid-way keeps the
    # finished tasks, and the request cache resumes the unfinished one
    res = json.loads(path.read_text()) if path.exists() else None
    for task in args.tasks.split(",") if args.tasks else TASKS:
        if res is not None and task in res["tasks"]:
            continue
        one = evaluate_tasks(model, tok, [task], limit=limit, batch_size=8, per_doc=True,
                             cache=folder / f"lm_cache_{limit}_{task}", label=label)
        from filelock import FileLock

        with FileLock(str(path) + ".lock"):  # several eval processes may share the file (--tasks)
            res = json.loads(path.read_text()) if path.exists() else None
            if res is None:
                res = one
            else:
                res["tasks"].update(one["tasks"])
                res["wall_time_s"] = res.get("wall_time_s", 0) + one.get("wall_time_s", 0)
            path.write_text(json.dumps(res, default=float))
        print(task, round(one["tasks"][task]["acc"], 4), f"{one.get('wall_time_s', 0):.0f} s", flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------
def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a torn last line of a killed run
    return out


def _tasks_record(res: dict | None) -> dict:
    from linearize.results import tasks_from_eval

    return tasks_from_eval(res)


def margin(student: dict, teacher: dict) -> float | None:
    """(student avg - chance avg) / (teacher avg - chance avg), only when both have all six tasks
    on the same number of documents (linearize.compare.above_chance_margin)."""
    from linearize.compare import above_chance_margin
    from linearize.results import TASKS, average

    if not all(t in student and t in teacher and student[t]["docs"] == teacher[t]["docs"] for t in TASKS):
        return None
    return above_chance_margin(average(student)[0], average(teacher)[0])


# The study grid's recipe column (make grid, preset cpu-grid) trains gla, xlstm and the rest with
# the project's recipe on the same mixed corpus and validation blocks as the mix-* recipes here;
# its committed records (runner --snapshot) join this page as recipe GRID_VARIANT.
GRID_RUN, GRID_VARIANT = "cpu-grid-qkv-fit-at", "grid"
GRID_ARCHS = ("gla", "deltanet", "xlstm")  # the one student per kernel family; the rest: docs/results.md
GRID_RECIPE = ("QKV copy, readout fit, 64K transfer (lr 1e-3), 16K distillation (lr 1e-4), on the mixed "
               "corpus: the study grid's recipe cell (`make grid`, preset cpu-grid, records in results/cpu-grid/)")


def collect(root: Path, limit: int, grid_root: Path | None = None, carry: dict | None = None) -> dict:
    """The recipe.json data (linearize.results' schema, with each run's ``curve``, ``fit_tokens``
    and ``margin`` added): one record per run folder ``outputs/<arch>/recipe-<name>``, and with
    ``grid_root`` one per ``<grid_root>/<arch>/cpu-grid-qkv-fit-at`` (variant "grid")."""
    from linearize.results import results_record, teacher_record

    teacher_res = _eval_path(root / "teacher-recipe", limit)
    teacher_tasks = _tasks_record(json.loads(teacher_res.read_text())) if teacher_res.exists() else {}
    if not teacher_tasks and carry:  # the teacher's evaluation from the page's twin (see carry_over)
        teacher_tasks = carry["teacher"].get("tasks") or {}
    folders = [(f, f.name.removeprefix("recipe-")) for f in sorted(root.glob("*/recipe-*"))]
    if grid_root is not None:
        folders += [(Path(grid_root) / a / GRID_RUN, GRID_VARIANT) for a in GRID_ARCHS
                    if (Path(grid_root) / a / GRID_RUN).is_dir()]
    runs, teacher_ppl = [], None
    for folder, variant in folders:
        run = _run_from_folder(folder, variant, limit, teacher_tasks)
        if run is None:
            continue
        if run["corpus"] in ("embedded", "sotu"):  # the teacher record's validation set
            teacher_ppl = run["teacher_ppl"] or teacher_ppl
        runs.append(run)
    _against_control(runs, root, limit)
    if grid_root is not None:
        _against_grid(runs, root, Path(grid_root), limit)
    teacher_raw = json.loads(teacher_res.read_text()) if teacher_res.exists() else None
    teacher_lambada = _lambada_ppl(teacher_raw)
    if carry:
        runs = carry_over(runs, carry)
        teacher_ppl = teacher_ppl or carry["teacher"].get("ppl")
        teacher_lambada = teacher_lambada if teacher_lambada is not None else carry.get("teacher_lambada_ppl")
    return results_record(teacher_record("SmolLM2-135M-Instruct (embedded)", teacher_ppl, teacher_tasks), runs,
                          teacher_lambada_ppl=teacher_lambada)


CONTROL = "window-w64"  # the window alone: what every hybrid is measured against


def _eval_raw(folder: Path, limit: int) -> dict | None:
    """A run's six-task result: recipe.py eval's file, else notebook 03's (a runner's run, the grid)."""
    from linearize.evaluate import results_path

    for path in (_eval_path(folder, limit), results_path(folder, limit, online=False)):
        if path.exists():
            return json.loads(path.read_text())
    return None


def _per_doc(folder: Path, limit: int) -> dict | None:
    raw = _eval_raw(folder, limit)
    if raw and raw.get("tasks") and all(t.get("per_doc") for t in raw["tasks"].values()):
        return raw
    return None


def _against_control(runs: list[dict], root: Path, limit: int) -> None:
    """Each hybrid whose folder is here gains ``vs_window``: its six-task average minus the
    window control's on the same documents, with a paired bootstrap interval over documents
    (linearize.compare), so the page can say whether training the linear branch bought anything
    the window alone does not have."""
    from linearize.compare import correctness, paired_bootstrap

    control = _per_doc(root / "gla" / f"recipe-{CONTROL}", limit)
    if control is None:
        return
    for run in runs:
        if not run.get("hybrid") or run["variant"] == CONTROL:
            continue
        mine = _per_doc(root / run["arch"] / f"recipe-{run['variant']}", limit)
        if mine is None or set(mine["tasks"]) != set(control["tasks"]):
            continue
        avg = paired_bootstrap(correctness(mine), correctness(control), seed=0)["avg"]
        run["vs_window"] = {k: avg[k] for k in ("diff", "lo", "hi", "p", "docs")}


def _against_grid(runs: list[dict], root: Path, grid_root: Path, limit: int) -> None:
    """Each pure run here with per-document results gains ``vs_grid``: its six-task average minus
    the study grid's recipe cell of the same student on the same documents (paired bootstrap).
    The grid cell is the recipe at the grid's budget; a run branched from it (mix-gi-kd: the same
    stages after the gate initialisation) measures what its one change buys."""
    from linearize.compare import correctness, paired_bootstrap

    for run in runs:
        if run.get("hybrid") or run["variant"] == GRID_VARIANT:
            continue
        cell = _per_doc(grid_root / run["arch"] / GRID_RUN, limit)
        mine = _per_doc(root / run["arch"] / f"recipe-{run['variant']}", limit)
        if cell is None or mine is None or set(mine["tasks"]) != set(cell["tasks"]):
            continue
        avg = paired_bootstrap(correctness(mine), correctness(cell), seed=0)["avg"]
        run["vs_grid"] = {k: avg[k] for k in ("diff", "lo", "hi", "p", "docs")}


def carry_over(runs: list[dict], previous: dict) -> list[dict]:
    """``runs`` (made from the run folders on this machine) plus every finished run of the
    previous docs/recipe.json whose folder is not here, marked ``carried``. The run folders live in
    the git-ignored outputs/ of the machine that trained them, and the page's JSON twin is the
    only committed record of them (a machine that lost outputs/ regenerates the page without
    losing its runs); a run here replaces the carried record of the same arch and variant."""
    here = {(r["arch"], r["variant"]) for r in runs}
    carried = [dict(r, carried=True) for r in previous.get("runs", [])
               if (r["arch"], r["variant"]) not in here and r.get("finished", True)]
    return carried + runs


def _run_from_folder(folder: Path, variant: str, limit: int, teacher_tasks: dict) -> dict | None:
    """One run record from a run folder's metrics, parameters and evaluation (None: no eval yet)."""
    from linearize.results import run_record
    from linearize.stages import STAGES

    records = _metrics(folder)
    evals = [r for r in records if r.get("event") == "eval"]
    if not evals:
        return None
    import yaml

    params = yaml.safe_load((folder / "params.yaml").read_text())
    fit = next((r for r in records if r.get("event") == "readout_fit"), None)
    gen = next((r for r in records if r.get("event") == "teacher_text"), None)  # text the teacher sampled
    # cumulative training tokens and wall time along the stages, in the order they ran
    curve, done_tokens = [], 0
    done_wall = (fit["wall_s"] if fit else 0.0) + (gen["wall_s"] if gen else 0.0)
    for r in evals:
        after = r["after"]
        stage_tokens, stage_wall = r.get("tokens", 0), r.get("stage_wall_s", 0.0)
        curve.append({"after": after, "tokens": done_tokens + stage_tokens, "wall_s": done_wall + stage_wall,
                      "ppl": r["perplexity"], "kl": r.get("kl"), "teacher_ppl": r.get("teacher_perplexity"),
                      # out-of-domain (wiki-val), where the run logged it (runs made before it existed did not)
                      "ood_ppl": r.get("ood_perplexity"), "ood_kl": r.get("ood_kl"),
                      "ood_teacher_ppl": r.get("ood_teacher_perplexity")})
        if "@" not in after and after != "conversion":
            done_tokens += stage_tokens
            done_wall += stage_wall
    raw = _eval_raw(folder, limit)
    tasks = _tasks_record(raw)
    last = curve[-1]
    return run_record(params["arch"], variant, bool(params.get("hybrid_window")),
                      last["tokens"], last["wall_s"], last["ppl"], last["kl"], tasks,
                      corpus=params.get("corpus", "embedded"), seq_len=params.get("seq_len", 128),
                      train_corpus=params.get("train_corpus") or None,
                      teacher_text={k: gen[k] for k in ("tokens", "documents", "wall_s", "prompt_corpus",
                                                        "prompt_tokens", "new_tokens")} if gen else None,
                      teacher_ppl=last["teacher_ppl"], ood_ppl=last["ood_ppl"], ood_kl=last["ood_kl"], ood_teacher_ppl=last["ood_teacher_ppl"],
                      fit_tokens=fit["tokens"] if fit else 0, lambada_ppl=_lambada_ppl(raw),
                      margin=margin(tasks, teacher_tasks) if teacher_tasks else None, curve=curve,
                      long_val=_read_json(folder / f"long_val_{LONG_SEQ}.json"),
                      hybrid_gate=_hybrid_gate(folder) if params.get("hybrid_window") else None,
                      # every enabled stage done; an unfinished run resumes where it
                      # stopped, and its curve so far is shown
                      finished=all((folder / f"stage{n}" / "done.json").exists()
                                   for n, spec in STAGES.items() if params.get(spec.flag)))


def _hybrid_gate(folder: Path) -> dict | None:
    """The weight a hybrid's heads give the softmax window after its last finished stage:
    sigmoid of every layer's ``hybrid.mix_logit`` (linearize.mixers.hybrid), mean / min / max,
    from the stage's saved weights (None when none are here, e.g. a records-only snapshot)."""
    import torch

    done = sorted(folder.glob("stage[0-9]/student.pt"))
    if not done:
        return None
    state = torch.load(done[-1], map_location="cpu", weights_only=True)
    state = state.get("model", state)
    gates = [torch.sigmoid(v.float().flatten()) for k, v in state.items() if k.endswith("hybrid.mix_logit")]
    if not gates:
        return None
    g = torch.cat(gates)
    return {"mean": float(g.mean()), "min": float(g.min()), "max": float(g.max()), "stage": done[-1].parent.name}


def _against_window_words(control: dict, hybrids: list[dict]) -> str:
    """The hybrids' KL against the window alone's, at the training context and at LONG_SEQ, in words."""
    out = []
    # a run trained on longer blocks has its own validation blocks: only the LONG_SEQ comparison
    # holds it
    for label, kl in (("at the training context (128)", lambda r: r["kl"] if r.get("seq_len", 128) == 128 else None),
                      (f"at {LONG_SEQ} tokens", lambda r: ((r.get("long_val") or {}).get("val") or {}).get("kl"))):
        c, hs = kl(control), [kl(r) for r in hybrids if kl(r) is not None]
        if c is None or not hs:
            continue
        lo, hi = min(hs), max(hs)
        change = (1 - hi / c, 1 - lo / c)
        verdict = (f"{100 * change[0]:.0f}-{100 * change[1]:.0f}% lower KL than the window alone" if change[0] > 0
                   else f"no lower KL than the window alone ({lo:.3f}-{hi:.3f} against {c:.3f})" if change[1] <= 0
                   else f"KL {lo:.3f}-{hi:.3f} against the window alone's {c:.3f}")
        out.append(f"{label} the trained hybrids have {verdict}")
    return ("; ".join(out)[:1].upper() + "; ".join(out)[1:] + ".") if out else ""


def _gate_move(run: dict, start: float = 0.99) -> float:
    """How far the farthest head's window weight went from its start (``hybrid_gate`` min/max)."""
    gate = run["hybrid_gate"]
    return max(abs(gate["min"] - start), abs(gate["max"] - start))


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _lambada_ppl(raw: dict | None) -> float | None:
    task = (raw or {}).get("tasks", {}).get("lambada_openai")
    return task.get("perplexity") if task else None


def _load_average() -> float:
    return os.getloadavg()[0]


def _long(run: dict, part: str) -> str:
    rec = (run.get("long_val") or {}).get(part)
    return f"{rec['ppl'] / rec['teacher_ppl']:.2f}x, {rec['kl']:.3f}" if rec else "-"


def _ood(p: dict) -> str:
    """A curve point's out-of-domain ppl / teacher and KL, or - where the run did not log them."""
    return f"{p['ood_ppl'] / p['ood_teacher_ppl']:.2f}x / {p['ood_kl']:.3f}" if p.get("ood_kl") else "-"


def _equal_token_points(run: dict, base: dict) -> list[tuple[dict, dict]]:
    """(run point, base point) pairs of two runs' curves after the same stage at equal tokens."""
    at = {(p["after"], p["tokens"]): p for p in base["curve"]}
    return [(p, at[(p["after"], p["tokens"])]) for p in run["curve"] if (p["after"], p["tokens"]) in at]


def _fit_spread_pairs(runs: list[dict], t_ppl: float) -> list[str]:
    """Words for each `spread-NAME` run (the readout fit on blocks spread over the training split)
    beside `mix-NAME` (the fit on the split's first blocks), at equal tokens."""
    out = []
    for r in runs:
        base = next((c for c in runs if c["arch"] == r["arch"] and r["variant"].startswith("spread-")
                     and c["variant"] == "mix-" + r["variant"][7:]), None)
        if base is None:
            continue
        t_of = lambda p: p.get("teacher_ppl") or t_ppl  # noqa: E731
        out += ["", f"Where the readout fit reads, {r['arch']} / `{r['variant']}` against `{base['variant']}` (the same "
                "recipe, seed and batches; the fit's 64 blocks spread evenly over the mix's training split against "
                "its first 64, which are parts of three documents), at equal tokens, ppl / teacher and KL, spread "
                "then first (out of domain in brackets): " + "; ".join(
                    f"{p['after']} {p['tokens'] // 1024}K: {p['ppl'] / t_of(p):.2f}x / {p['kl']:.3f} vs "
                    f"{q['ppl'] / t_of(q):.2f}x / {q['kl']:.3f}" + (f" ({_ood(p)} vs {_ood(q)})" if p.get("ood_kl") else "")
                    for p, q in _equal_token_points(r, base)) + "."]
        points = _equal_token_points(r, base)
        if points and points[-1][0].get("ood_kl") and points[-1][1].get("ood_kl"):
            p, q = points[-1]
            out[-1] += (f" At the end, KL {p['kl'] - q['kl']:+.3f} nats in domain and {p['ood_kl'] - q['ood_kl']:+.3f} "
                        "out of domain (spread minus first).")
    return out


def _precision_pairs(runs: list[dict], t_ppl: float) -> list[str]:
    """Words for each bf16 run beside its float32 control (recipe NAME-bf16 against NAME, same
    student): the curves point by point at equal tokens, and the wall time."""
    out = []
    for r in runs:
        if not r["variant"].endswith("-bf16"):
            continue
        base = next((c for c in runs if c["arch"] == r["arch"] and c["variant"] == r["variant"][:-5]), None)
        if base is None:
            continue
        points = _equal_token_points(r, base)
        t_of = lambda p: p.get("teacher_ppl") or t_ppl  # noqa: E731
        out += ["", f"bf16 autocast for training, {r['arch']} / `{r['variant']}` against its float32 control "
                f"`{base['variant']}` (the same recipe, seed and batches; validation in float32 for both), at "
                "equal tokens, ppl / teacher and KL, bf16 then float32: " + "; ".join(
                    f"{p['after']} {p['tokens'] // 1024}K: {p['ppl'] / t_of(p):.2f}x vs {q['ppl'] / t_of(q):.2f}x, "
                    f"KL {p['kl']:.3f} vs {q['kl']:.3f}" for p, q in points)
                + f". Wall time (fit + stages) {r['wall_s'] / 60:.1f} against {base['wall_s'] / 60:.1f} min, "
                "on a machine shared with the study grid (one thread each; a ratio of upper bounds)."]
    return out


def _teacher_text_pairs(runs: list[dict], t_ppl: float) -> list[str]:
    """Words for each run trained on text the teacher sampled (recipe gen-NAME) beside its
    control mix-NAME (the same recipe on the mix's own training text), validated on the same
    blocks: the curves at equal tokens, in domain and out of domain, and the wall time."""
    out = []
    for r in runs:
        if r.get("train_corpus") != "teacher-text" or not r["variant"].startswith("gen-"):
            continue
        base = next((c for c in runs if c["arch"] == r["arch"] and c["variant"] == "mix-" + r["variant"][4:]), None)
        if base is None:
            continue
        points = _equal_token_points(r, base)
        t_of = lambda p: p.get("teacher_ppl") or t_ppl  # noqa: E731

        gen = r.get("teacher_text") or {}
        out += ["", f"Text the teacher samples itself, {r['arch']} / `{r['variant']}` against `{base['variant']}` "
                f"(the same recipe, seed and schedule; the readout fit and every stage read "
                f"{gen.get('documents', '?')} documents the teacher sampled at temperature 1 after "
                f"{gen.get('prompt_tokens', '?')}-token prompts of the mix's training split, "
                f"{gen.get('tokens', 0):,} tokens, instead of the mix's own text; both validated on the mix's "
                "validation blocks and on wiki-val), at equal tokens, ppl / teacher and KL, teacher text then the "
                "mix (out of domain in brackets): " + "; ".join(
                    f"{p['after']} {p['tokens'] // 1024}K: {p['ppl'] / t_of(p):.2f}x / {p['kl']:.3f} vs "
                    f"{q['ppl'] / t_of(q):.2f}x / {q['kl']:.3f} ({_ood(p)} vs {_ood(q)})" for p, q in points)
                + f". Wall time {r['wall_s'] / 60:.1f} min, of which {gen.get('wall_s', 0) / 60:.1f} generating the "
                f"text, against {base['wall_s'] / 60:.1f} min (one thread each, beside the study grid: upper bounds)."]
        if points:
            p, q = points[-1]
            first, first_base = points[0]
            verdict = ("lower" if p["kl"] < q["kl"] - 0.01 else "higher" if p["kl"] > q["kl"] + 0.01 else "the same")
            out[-1] += (f" At the start (the readout fit alone) the teacher's text gave KL {first['kl']:.3f} against "
                        f"{first_base['kl']:.3f}; at the end the KL is {verdict} ({p['kl']:.3f} against {q['kl']:.3f}) "
                        f"and the perplexity on the mix's real text {p['ppl'] / t_of(p):.2f}x against "
                        f"{q['ppl'] / t_of(q):.2f}x.")
    return out


def _longer_block_pairs(runs: list[dict]) -> list[str]:
    """Words for each run trained on longer blocks (recipe NAME-sN) beside its 128-token twin NAME,
    at LONG_SEQ tokens, where both are measured on the same blocks."""
    out = []
    for r in runs:
        base_name, _, seq = r["variant"].rpartition("-s")
        base = next((c for c in runs if c["arch"] == r["arch"] and c["variant"] == base_name), None)
        if not seq.isdigit() or base is None or not r.get("long_val") or not base.get("long_val"):
            continue

        def kl(run, part):
            return run["long_val"][part]["kl"]
        out += ["", f"Trained on {seq}-token blocks, {r['arch']} / `{r['variant']}` against its 128-token twin "
                f"`{base_name}` at {LONG_SEQ} tokens (the same blocks): KL {kl(r, 'val'):.3f} against "
                f"{kl(base, 'val'):.3f} on the run's corpus, {kl(r, 'ood'):.3f} against {kl(base, 'ood'):.3f} "
                "out of domain" + (". Longer training blocks did not bring the KL at 512 tokens down."
                                   if kl(r, "val") >= kl(base, "val") else ".")]
    return out


# the marker of a curve point: where a stage ends, its stage; inside a stage, a small dot
_STAGE_MARKERS = {"conversion": "o", "stage0": "s", "stage1": "D", "stage2": "v", "stage3": "^"}


def plot_curves(runs: list[dict], figure: Path, plt) -> None:
    """One row per student, three panels: validation perplexity over the teacher's, KL, and KL out
    of domain, against training tokens. Both axes are logarithmic (x symmetric-log, so 0 tokens
    shows): the runs span 0 to 1M tokens and ratios from 1 to 1e5, which linear axes squash into
    a corner. Hybrids are dashed; a marker's shape says which stage a point ends."""
    archs = list(dict.fromkeys(r["arch"] for r in runs))
    fig, axes = plt.subplots(len(archs), 3, figsize=(17, 3.6 * len(archs)), squeeze=False)
    palette = plt.get_cmap("tab20").colors
    panels = (("ppl", "validation ppl / teacher's", (1.5, "pure target 1.5x"), (1.15, "hybrid target 1.15x")),
              ("kl", "KL(teacher || student), nats", (0.40, "pure target 0.40"), (0.14, "hybrid target 0.14")),
              ("ood_kl", "out-of-domain KL (wiki-val), nats", None, None))
    for row, arch in zip(axes, archs):
        mine = [r for r in runs if r["arch"] == arch]
        for i, run in enumerate(mine):
            colour = palette[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
            for ax, (key, _, _, _) in zip(row, panels):
                have = [p for p in run["curve"] if p.get(key) is not None]
                if not have:
                    continue
                ys = [p[key] / p["teacher_ppl"] if key == "ppl" else p[key] for p in have]
                xs = [p["tokens"] / 1e3 for p in have]
                ax.plot(xs, ys, color=colour, ls="--" if run["hybrid"] else "-", lw=1.4,
                        label=f"{run['variant']}" + (" (hybrid)" if run["hybrid"] else ""))
                for x, y, p in zip(xs, ys, have):
                    stage = p["after"].split("@")[0]
                    inside = "@" in p["after"]
                    ax.plot([x], [y], marker=_STAGE_MARKERS.get(stage, "o"), color=colour,
                            ms=3 if inside else 6, ls="none")
        for ax, (key, ylabel, *targets) in zip(row, panels):
            ax.set_xscale("symlog", linthresh=16)
            ax.set_yscale("log")
            ax.set_xticks([0, 16, 64, 256, 1024])
            ax.set_xticklabels(["0", "16K", "64K", "256K", "1M"])
            ax.set(xlabel="training tokens", ylabel=ylabel, title=f"{arch}: {ylabel}")
            ax.grid(True, which="major", alpha=0.3)
            for target, side in zip(targets, ("right", "left")):  # the two labels at opposite ends
                if target:
                    ax.axhline(target[0], ls=":", c="grey", lw=1)
                    ax.text(0.99 if side == "right" else 0.01, target[0], target[1], transform=ax.get_yaxis_transform(),
                            ha=side, va="bottom", color="grey", fontsize=8)
        # the first panel's lines: every run has a validation curve, older ones no out-of-domain one
        row[-1].legend(*row[0].get_legend_handles_labels(), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       title=arch, title_fontsize=9)
    stages = [plt.Line2D([], [], marker=m, color="k", ls="none", label=f"end of {s}") for s, m in _STAGE_MARKERS.items()]
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.1 / len(archs)))
    fig.legend(handles=stages, loc="upper center", ncol=len(stages), fontsize=9, bbox_to_anchor=(0.5, 1.0))
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_report(data: dict, md: Path, js: Path, figure: Path, limit: int, grid_root: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from linearize.results import TASKS, write_json

    write_json(js, data)
    t_ppl = data["teacher"]["ppl"]
    plot_curves(data["runs"], figure, plt)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    lines = [
        "# Recipes on a CPU budget: token-efficiency curves",
        "",
        "Generated by `benchmarks/recipe.py report`; do not edit by hand. The data is "
        "[recipe.json](recipe.json) (same code, same run). Regenerate with:",
        "",
        "```bash",
        *[f"python benchmarks/recipe.py run --arch {r['arch']} --recipe {r['variant']}" for r in data["runs"]
          if r["variant"] != GRID_VARIANT],
        *(["make grid && make grid-snapshot   # the grid's recipe cells (variant grid), results/cpu-grid/"]
          if any(r["variant"] == GRID_VARIANT for r in data["runs"]) else []),
        f"python benchmarks/recipe.py eval --teacher --limit {limit}",
        f"python benchmarks/recipe.py eval --arch ARCH --recipe RECIPE --limit {limit}",
        "python benchmarks/recipe.py report" + (f" --grid-root {grid_root}" if grid_root else ""),
        "```",
        "",
        f"Commit {commit}; 2-core CPU, float32 unless a recipe says bf16; load average when the page was written: {_load_average():.1f} "
        "(other jobs shared the cores during most of these runs, so wall times are upper bounds).",
        f"Preset `{PRESET}` (params/presets/{PRESET}.yaml): seq 128, batch 8; validation on 32 blocks of "
        f"128 tokens (4K tokens) of the held-out split of the run's training corpus (`corpus`), the same "
        f"blocks for every point of a run and for the teacher; teacher perplexity there: {t_ppl:.2f} on the "
        "embedded corpus (SOTU), " + ", ".join(sorted({f"{r['teacher_ppl']:.2f} on `{r['corpus']}`"
                                                     + ("" if r.get("seq_len", 128) == 128 else f" ({r['seq_len']}-token blocks)")
                                                     for r in data["runs"]
                                                     if r.get("corpus") not in (None, "embedded", "sotu")}) or ["-"])
        + ". Every ratio is against the teacher on the same blocks. Out of domain: 16 blocks of `wiki-val`, "
        "Wikipedia articles no run trains on. Training and this validation use 128-token blocks, where a "
        f"64-token softmax window covers half of every block; the `@{LONG_SEQ}` columns (`recipe.py longval`: "
        f"{LONG_BLOCKS} blocks of {LONG_SEQ} tokens, the same 4K tokens for teacher and student) are the "
        "final student at a context four times longer than it was trained on.",
        "",
        "Recipes:",
        "",
        *[f"- `{k}`: {v[1]}" for k, v in RECIPES.items() if any(r["variant"] == k for r in data["runs"])],
        *([f"- `{GRID_VARIANT}`: {GRID_RECIPE}"] if any(r["variant"] == GRID_VARIANT for r in data["runs"]) else []),
        "",
        "`tokens` counts training tokens over all stages; the closed-form readout fit reads another "
        "`fit` tokens (teacher-forced, no gradient). Curve points inside a stage are taken mid-schedule: "
        "in stage 0 (warmup-stable-decay) before the final decay, in stage 3 (linear warmup, then linear "
        "decay) at a rate not yet decayed, so a point inside a stage is not what a run of that budget "
        "reaches (compare `mix-long-bf16` and `mix-1m-bf16`, one stage 0 and two stage-3 lengths, at "
        "equal tokens).",
        "",
        f"![curves](figures/{figure.name})",
        "",
        "| student | recipe | corpus | tokens | fit | wall (min, fit + stages) | ppl | ppl / teacher | KL "
        f"| OOD ppl / teacher | OOD KL | @{LONG_SEQ}: ppl / teacher, KL | @{LONG_SEQ} OOD | tasks (docs) | margin |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in data["runs"]:
        docs = min((t["docs"] for t in r["tasks"].values()), default=0)
        tasks = f"{len(r['tasks'])} ({docs})" if r["tasks"] else "-"
        m = f"{100 * r['margin']:.0f}%" if r.get("margin") is not None else "-"
        ood = (f"{r['ood_ppl'] / r['ood_teacher_ppl']:.2f}x | {r['ood_kl']:.3f}" if r.get("ood_ppl") else "- | -")
        name = r["variant"] if r.get("finished", True) else f"{r['variant']} (unfinished: {r['curve'][-1]['after']})"
        if r.get("seq_len", 128) != 128:  # its ppl, KL and curve are on its own blocks: not comparable
            name += f" (trained and validated on {r['seq_len']}-token blocks)"
        corpus = r.get("corpus", "embedded")
        if r.get("train_corpus"):  # trained on other text, validated on `corpus`
            corpus = f"trained on {r['train_corpus']}, validated on {corpus}"
        lines.append(f"| {r['arch']} | {name} | {corpus} | {r['tokens']:,} | "
                     f"{r['fit_tokens']:,} | {r['wall_s'] / 60:.1f} | {r['ppl']:.2f} | "
                     f"{r['ppl'] / (r.get('teacher_ppl') or t_ppl):.2f}x | {r['kl']:.3f} | {ood} | {_long(r, 'val')} | "
                     f"{_long(r, 'ood')} | {tasks} | {m} |")
    gated = [r for r in data["runs"] if r.get("hybrid_gate")]
    if gated:
        lines += ["", "Where the hybrids' quality comes from: the weight each head gives the softmax window "
                  "(sigmoid of `hybrid.mix_logit`, learned, starting at 0.99) after training: " + "; ".join(
                      f"{r['arch']} / {r['variant']} mean {r['hybrid_gate']['mean']:.4f} "
                      f"(min {r['hybrid_gate']['min']:.4f}, max {r['hybrid_gate']['max']:.4f})" for r in gated)
                  + ". Largest move of a head from the 0.99 start: " + "; ".join(
                      f"{r['arch']} / {r['variant']} {_gate_move(r):.4f}" for r in gated)
                  + ". AdamW moves a parameter by about its learning rate per step, so at the stages' 1e-3 a "
                    "64-step stage can move a mix logit by about 0.06 (the sigmoid by about 0.0006 near 0.99): "
                    "runs without their own mix rate could not move their gates. `hybrid_mix_lr` gives the mix "
                    "its own rate (mix-at-w64-gate: 0.05, a logit move of about 3 possible); where a run's heads "
                    f"then still keep {min(r['hybrid_gate']['min'] for r in gated):.2f} or more on the window, "
                    "training itself chose the window: what the hybrids keep of the teacher is mostly the "
                    "window's (64 tokens + 4 sinks), and the control below says how much."]
    control = next((r for r in data["runs"] if r["variant"] == "window-w64"), None)
    if control is not None:
        hybrids = [r for r in data["runs"] if r.get("hybrid") and r is not control]
        t_of = lambda r: r.get("teacher_ppl") or t_ppl  # noqa: E731
        lines += ["", f"The control (`window-w64`): the 64-token window and 4 sinks alone, the linear branch "
                  f"switched off, the teacher's own weights, no training: {control['ppl'] / t_of(control):.2f}x the "
                  f"teacher's perplexity, KL {control['kl']:.3f}, @{LONG_SEQ} {_long(control, 'val')}"
                  + (f", {100 * control['margin']:.0f}% of the margin" if control.get("margin") is not None else "")
                  + ". The trained hybrids: " + "; ".join(
                      f"{r['arch']} / {r['variant']} "
                      + (f"{r['ppl'] / t_of(r):.2f}x, KL {r['kl']:.3f}, " if r.get("seq_len", 128) == 128 else "")
                      + f"@{LONG_SEQ} {_long(r, 'val')}"
                      + (f", {100 * r['margin']:.0f}%" if r.get("margin") is not None else "")
                      for r in hybrids)
                  + ". " + _against_window_words(control, hybrids)
                  + " A hybrid is worth its linear branch only where it beats this control"
                  + ("; paired on the same documents (six-task average, hybrid minus window alone, 95% bootstrap "
                     "interval over documents): " + "; ".join(
                         f"{r['arch']} / {r['variant']} {100 * r['vs_window']['diff']:+.1f} points "
                         f"({100 * r['vs_window']['lo']:+.1f} to {100 * r['vs_window']['hi']:+.1f})"
                         for r in hybrids if r.get("vs_window"))
                     if any(r.get("vs_window") for r in hybrids) else
                     " (no hybrid evaluated on this machine keeps its per-document results, so no paired test yet)")
                  + "."]
    paired = [r for r in data["runs"] if r.get("vs_grid")]
    if paired:
        lines += ["", "Paired against the study grid's recipe cell of the same student (`grid`; six-task average, "
                  "run minus grid cell on the same documents, 95% bootstrap interval over documents): " + "; ".join(
                      f"{r['arch']} / {r['variant']} {100 * r['vs_grid']['diff']:+.1f} points "
                      f"({100 * r['vs_grid']['lo']:+.1f} to {100 * r['vs_grid']['hi']:+.1f}, "
                      f"{r['vs_grid']['docs']} documents)" for r in paired)
                  + ". An interval that covers 0 says the documents do not separate the two."]
    lines += _precision_pairs(data["runs"], t_ppl)
    lines += _teacher_text_pairs(data["runs"], t_ppl)
    lines += _fit_spread_pairs(data["runs"], t_ppl)
    lines += _longer_block_pairs(data["runs"])
    carried = [r for r in data["runs"] if r.get("carried")]
    if carried:
        lines += ["", f"{len(carried)} run(s) carried from the previous docs/recipe.json (their run folders, in "
                  "the git-ignored outputs/ of the machine that trained them, are not on this machine; the twin "
                  "is their committed record): " + ", ".join(f"{r['arch']} / {r['variant']}" for r in carried) + "."]
    if data.get("unfinished"):
        lines += ["", "Unfinished, resumable with the same command (not shown): " + ", ".join(
            f"{u['arch']} / {u['variant']} (after {u['after']})" for u in data["unfinished"]) + "."]
    lines += ["", "## Curves", ""]
    for r in data["runs"]:
        lines.append(f"**{r['arch']} / {r['variant']}**: " + ", ".join(
            f"{p['after']} {p['tokens'] // 1024}K: {p['ppl'] / (p.get('teacher_ppl') or t_ppl):.2f}x / KL {p['kl']:.3f}"
            + (f" (OOD {p['ood_ppl'] / p['ood_teacher_ppl']:.2f}x / {p['ood_kl']:.3f})" if p.get("ood_ppl") else "")
            for p in r["curve"]))
        lines.append("")
    teacher = data["teacher"]["tasks"]
    if teacher:
        lines += ["## Six tasks (accuracy %, ± stderr), the same documents for teacher and students", "",
                  "| model | " + " | ".join(TASKS) + " | avg | margin |", "|---|" + "---:|" * (len(TASKS) + 2)]

        def row(name, tasks, m):
            cells = [f"{100 * tasks[t]['acc']:.1f} ± {100 * tasks[t]['stderr']:.1f}" if t in tasks else "-" for t in TASKS]
            if all(t in tasks for t in TASKS):
                avg = f"{100 * sum(tasks[t]['acc'] for t in TASKS) / len(TASKS):.1f}"
            else:  # an average over some tasks would not compare with the teacher's over six
                avg = f"- ({len(tasks)} of {len(TASKS)} tasks)"
            return f"| {name} | " + " | ".join(cells) + f" | {avg} | {m} |"

        lines.append(row("teacher", teacher, "100%"))
        for r in data["runs"]:
            if r["tasks"]:
                lines.append(row(f"{r['arch']} / {r['variant']}", r["tasks"],
                                 f"{100 * r['margin']:.0f}%" if r.get("margin") is not None else "-"))
        lines += ["", "Margin = (student avg - chance avg) / (teacher avg - chance avg); chance 0 for LAMBADA, "
                  "0.5 for WinoGrande and PIQA, 0.25 for ARC and HellaSwag.", ""]
        lamb = [(f"{r['arch']} / {r['variant']}", r.get("lambada_ppl")) for r in data["runs"] if r.get("lambada_ppl")]
        if lamb and data.get("teacher_lambada_ppl"):
            lines += ["LAMBADA perplexity of the target word (lm-eval's `perplexity`, same documents): teacher "
                      f"{data['teacher_lambada_ppl']:,.1f}; " + "; ".join(f"{n} {p:,.1f}" for n, p in lamb)
                      + ". The validation perplexity (the training corpus's own domain) does not carry over to "
                      "LAMBADA (novels; the last word usually refers back into the passage). Where the pure "
                      "students lose most is on tokens their context already holds (a bigram seen earlier in "
                      "the block, what the teacher predicts by looking back): `python benchmarks/copy_gap.py "
                      "RUN...` prints that gap beside the rest on wiki-val; a softmax window closes most of it.",
                      ""]
    md.write_text("\n".join(lines) + "\n")


def cmd_report(args) -> int:
    twin = ROOT / "docs" / "recipe.json"
    carry = json.loads(twin.read_text()) if args.carry and twin.exists() else None
    data = collect(Path(args.root), args.limit, Path(args.grid_root) if args.grid_root else None, carry)
    # an unfinished run (one resumed in a later session) is named, not tabulated: its curve so far
    # is the start of the run it was branched into, or of its own finished run later
    data["unfinished"] = [{"arch": r["arch"], "variant": r["variant"], "after": r["curve"][-1]["after"]}
                          for r in data["runs"] if not r["finished"]]
    data["runs"] = [r for r in data["runs"] if r["finished"]]
    if not data["runs"]:
        raise SystemExit(f"no recipe runs under {args.root}/*/recipe-*: run `benchmarks/recipe.py run` first")
    write_report(data, ROOT / "docs" / "recipe.md", ROOT / "docs" / "recipe.json",
                 ROOT / "docs" / "figures" / "recipe_curves.png", args.limit, args.grid_root)
    print(f"wrote docs/recipe.md and docs/recipe.json ({len(data['runs'])} runs)")
    return 0


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "lib"))
    from linearize.paths import OUTPUTS

    parser = argparse.ArgumentParser(prog="benchmarks/recipe.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="train one student with one recipe (resumes)")
    p_run.add_argument("--arch", required=True)
    p_run.add_argument("--recipe", default="at", help=", ".join(RECIPES))
    p_run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p_run.add_argument("--from", dest="branch_from", default=None,
                       help="start from this recipe's finished stage 0 (same arch), e.g. --from at")
    p_eval = sub.add_parser("eval", help="six tasks on a finished run (or --teacher), resumable")
    p_eval.add_argument("--arch")
    p_eval.add_argument("--recipe", default="at")
    p_eval.add_argument("--teacher", action="store_true")
    p_eval.add_argument("--limit", type=int, default=500)
    p_eval.add_argument("--tasks", default=None, help="comma-separated subset (default: the six, in order)")
    p_long = sub.add_parser("longval", help=f"a finished run against the teacher at {LONG_SEQ}-token context")
    p_long.add_argument("--arch", required=True)
    p_long.add_argument("--recipe", default="at")
    p_rep = sub.add_parser("report", help="write docs/recipe.md and docs/recipe.json")
    p_rep.add_argument("--limit", type=int, default=500)
    p_rep.add_argument("--grid-root", default=None, metavar="DIR",
                       help="also the study grid's recipe cells from this snapshot (results/cpu-grid)")
    p_rep.add_argument("--no-carry", dest="carry", action="store_false",
                       help="only the run folders on this machine (default: keep the runs of the previous "
                            "docs/recipe.json whose folders are not here, marked carried)")
    for p in (p_run, p_eval, p_long, p_rep):
        p.add_argument("--root", default=str(OUTPUTS))
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    return {"run": cmd_run, "eval": cmd_eval, "longval": cmd_longval, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
