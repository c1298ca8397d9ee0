"""Text the teacher writes itself, as a training corpus (``train_corpus: teacher-text``).

Distillation matches the student to the teacher on whatever text it is shown. On a corpus of one
domain, that is the teacher's behaviour on that domain only; on text the teacher samples itself
(temperature 1, no top-k or top-p), it is the teacher's behaviour where the teacher puts its own
probability mass. Each document starts from a short prompt of real text, the first
``teacher_text_prompt`` tokens of a training block of the run's ``corpus``, so that the samples
cover that corpus's topics, and continues with up to ``teacher_text_new`` sampled tokens; a
document ends early where the teacher ends it (its end-of-text or chat end token). The prompt
stays in the document: it is what the teacher saw.

Generation uses ``transformers``' own ``generate`` with the KV cache. The documents are cached
as one JSONL file per (teacher, prompt corpus, sizes, seed) under ``<cache>/teacher-text/``, so
every run with the same settings trains on the same bytes; the cache key is in the folder name
and the settings are in ``meta.json`` beside it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from .paths import cache_dir

TRAIN_CORPUS_NAME = "teacher-text"


def _slug(text: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text))
    return f"{safe[:40]}-{hashlib.sha256(str(text).encode()).hexdigest()[:8]}"


def corpus_folder(params: dict) -> Path:
    """The cache folder of the teacher text ``params`` asks for (it may not exist yet)."""
    key = (f"{_slug(params['teacher'])}_{_slug(params['corpus'])}_{params['teacher_text_tokens']}"
           f"_p{params['teacher_text_prompt']}_n{params['teacher_text_new']}_s{params['seed']}")
    return cache_dir("teacher-text") / key


def sample(teacher, prompts: torch.Tensor, new_tokens: int, stop_ids: list[int], seed: int) -> list[list[int]]:
    """Each prompt (a row of ``prompts``) with up to ``new_tokens`` tokens the teacher samples
    after it at temperature 1, cut at the first of ``stop_ids``. Seeded: the same prompts and
    seed give the same tokens."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = teacher.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=stop_ids,
            pad_token_id=stop_ids[0])
    docs = []
    for row in out.tolist():
        new = row[prompts.shape[1]:]
        for i, tok in enumerate(new):
            if tok in stop_ids:
                new = new[:i]
                break
        docs.append(row[:prompts.shape[1]] + new)
    return docs


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end a sampled document: the pretraining separator, the eos, the chat end."""
    from .data import separator_id

    vocab = tokenizer.get_vocab()
    ids = [separator_id(tokenizer), tokenizer.eos_token_id, vocab.get("<|im_end|>")]
    return list(dict.fromkeys(i for i in ids if i is not None))


def meta(params: dict) -> dict | None:
    """What the finished teacher text of ``params`` holds and cost (``meta.json``); None before."""
    path = corpus_folder(params) / "meta.json"
    return json.loads(path.read_text()) if (corpus_folder(params) / "docs.jsonl").exists() and path.exists() else None


def ensure_corpus(teacher, tokenizer, params: dict, batch_size: int = 64, progress: bool = True) -> Path:
    """The JSONL file of the run's teacher text, generated first if it is not in the cache.

    ``teacher_text_tokens`` is the total (prompts included) to reach; generation stops after the
    batch that reaches it. A crash loses at most the batch under way: each finished batch is
    a file of its own under ``batches/``, and ``docs.jsonl`` is written only when all are done."""
    from .data import token_blocks
    from .runs import atomic_write_text

    folder = corpus_folder(params)
    final = folder / "docs.jsonl"
    if final.exists():
        return final
    folder.mkdir(parents=True, exist_ok=True)
    parts = folder / "batches"  # one file per finished batch, each written whole (tmp + rename)
    target = int(params["teacher_text_tokens"])
    p_len, n_new = int(params["teacher_text_prompt"]), int(params["teacher_text_new"])
    if p_len < 1 or n_new < 1 or target < 1:
        raise ValueError(f"teacher_text_prompt, teacher_text_new and teacher_text_tokens must be positive, got "
                         f"{p_len}, {n_new}, {target}.")
    prompts = token_blocks(tokenizer, params["corpus"], p_len, "train", params["val_fraction"])
    # prompts from blocks spread over the whole training split, in a seeded order
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(params["seed"]))
    stops = stop_token_ids(tokenizer)
    done, tokens = [], 0
    if parts.exists():
        done = [json.loads(line) for part in sorted(parts.glob("batch-*.jsonl"))
                for line in part.read_text().splitlines() if line.strip()]
        tokens = sum(d["tokens"] for d in done)
    parts.mkdir(exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=target, initial=min(tokens, target), desc="teacher text", unit="tok")
    b = max(d["batch"] for d in done) + 1 if done else 0  # the next batch's number (its seed)
    was_training = teacher.training
    teacher.eval()
    try:
        while tokens < target:
            start = len(done) % len(order)  # the prompts after those already used
            idx = order[start:start + batch_size]
            t = time.perf_counter()
            rows = sample(teacher, prompts[idx].to(next(teacher.parameters()).device), n_new, stops,
                          seed=params["seed"] * 1_000_003 + b)
            wall = time.perf_counter() - t
            # each record carries its batch's wall time, so a resumed corpus still knows its cost
            recs = [{"text": tokenizer.decode(row), "tokens": len(row), "batch": b, "batch_wall_s": wall}
                    for row in rows]
            atomic_write_text(parts / f"batch-{b:05d}.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
            tokens += sum(r["tokens"] for r in recs)
            done += recs
            if bar is not None:
                bar.update(min(sum(len(r) for r in rows), max(target - bar.n, 0)))
            b += 1
    finally:
        teacher.train(was_training)
        if bar is not None:
            bar.close()
    info = {"teacher": str(params["teacher"]), "prompt_corpus": str(params["corpus"]),
            "prompt_tokens": p_len, "new_tokens": n_new, "target_tokens": target, "seed": params["seed"],
            "documents": len(done), "tokens": tokens,
            "wall_s": sum({d["batch"]: d["batch_wall_s"] for d in done}.values()),
            "sampling": "temperature 1, no top-k, no top-p; transformers generate with the KV cache",
            "stop_ids": stops}
    atomic_write_text(folder / "meta.json", json.dumps(info, indent=1))
    atomic_write_text(final, "".join(json.dumps(d) + "\n" for d in done))
    shutil.rmtree(parts)
    return final

