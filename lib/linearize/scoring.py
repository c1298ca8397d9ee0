"""Multiple-choice scoring that reads each shared context once.

lm-eval scores a multiple-choice document as one request per choice, each a full forward of
context + choice. ``SharedContextLM`` is lm-eval's HFLM with one change: the choices of a
document are scored together, its context in one forward (keeping the cache: a key/value cache
for the teacher, the mixer states for a student), then every choice from a copy of that cache;
logits and log-softmax only at the scored positions. Documents are batched by context length.
Counted with the embedded tokenizer over the full test sets (``benchmarks/shared_context.py
--count-tokens``), HFLM's padded batches feed 1.59x (HellaSwag), 2.79x (ARC-Easy), 2.62x
(ARC-Challenge) and 1.21x (PIQA) the tokens this does, and 1.6-7.1x the language-model-head
positions; measured time is less (1.08-1.35x, docs/shared_context.md). Results are the same log-likelihoods and greedy flags
up to float rounding (tests/test_scoring.py compares both paths on the same requests).

Requests that share no context (LAMBADA, WinoGrande's partial scoring, rolling perplexity),
contexts of a length too rare to batch, and requests longer than the model's window are scored
as HFLM scores them (one right-padded row per request, rows sorted by length and batched), but
with the output projection and log-softmax only at the continuation positions
(``_score_plain``): HFLM projects every position onto the vocabulary. Models that are not a
decoder plus an output projection go through HFLM's own path unchanged.
"""
from __future__ import annotations

import inspect
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from .memory import tensor_bytes


def _cache_argument(model) -> str:
    """The forward's name for the cache: ``cache`` for our students and transformers >= 5,
    ``past_key_values`` before (pyproject allows transformers 4.56)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# Fewest documents of one context length that are scored together. A lone short context is a
# forward too small to keep two CPU threads busy (measured: HellaSwag at 2 threads, one
# context at a time, ran no faster than HFLM's 8-row batches despite ~40% fewer tokens), so
# rarer lengths go through HFLM's batches instead.
MIN_BUCKET = 4

# Most bytes of cache one shared-context batch may hold: its documents' context states plus the
# per-choice copies. A recurrent state does not shrink with a short context: ReBased's is ~146 MB
# a row (30 layers x 9 heads x 2080 x 65 floats), so 8 documents of 4-5 choices held ~6 GB and,
# with the forward's own buffers, 10.6 GB in one of the two evaluation workers when the kernel
# killed it (grid kd cell, 2026-12-02). ReBased now shares no context at all (MAX_SHARED_ROW_BYTES
# below); 1.5 GiB a worker bounds any model between the two limits and does not touch the small
# students (a few MB a row) or the teacher's short contexts.
STATE_BUDGET_BYTES = 3 << 29


# Above this many bytes of cache a row, a context is not shared: copying a state that large for
# every choice (and reading it back in the continuation's forward) costs more than running the
# context again. Measured on ReBased (146 MB a row; the grid's kd cell), HellaSwag at 24
# documents, one thread: 34 CPU s shared, 19 s one row per request (benchmarks/eval_speed.py
# --run <a rebased run> --limit 24 --tasks hellaswag --threads 1 --max-shared-state-mb 1000 / 32);
# gla and hedgehog (a few MB a row) ran level shared and unshared at that size (where few
# contexts are shared); the full-set gain of sharing was measured on the teacher
# (docs/shared_context.md). The teacher's key/value cache passes this only past ~730 tokens.
MAX_SHARED_ROW_BYTES = 32 << 20


def batch_documents(choices: list[int], per_batch: int, row_bytes: int,
                    budget: int = STATE_BUDGET_BYTES) -> list[slice]:
    """Consecutive batches of documents with ``choices[d]`` continuations each: at most
    ``per_batch`` documents, and at most ``budget`` bytes of cache with ``row_bytes`` a row
    (one row per document for its context, then one per continuation). A document alone over
    the budget is still scored, alone."""
    batches, start, rows = [], 0, 0
    for d, n in enumerate(choices):
        if d > start and (d - start >= per_batch or (rows + 1 + n) * row_bytes > budget):
            batches.append(slice(start, d))
            start, rows = d, 0
        rows += 1 + n
    if choices:
        batches.append(slice(start, len(choices)))
    return batches


def plan_requests(requests, max_length: int, min_bucket: int = MIN_BUCKET) -> tuple[list, list[int]]:
    """How ``SharedContextLM`` scores ``requests`` (lm-eval's (key, context ids, continuation
    ids) triples): (buckets, plain). A bucket is a list of documents whose contexts have one
    length, each document the list of request indices that share its context; ``plain`` are
    the indices scored one row per request."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (_, ctx, cont) in enumerate(requests):
        if len(ctx) + len(cont) <= max_length + 1 and len(ctx) > 0:  # no left truncation
            groups[tuple(ctx)].append(i)
    buckets: dict[int, list[list[int]]] = defaultdict(list)
    for ctx, idx in groups.items():
        # Sharing saves the context's tokens once per extra choice but costs a second,
        # smaller forward: below a context as long as the longest choice it does not pay
        # (PIQA, goal ~15 tokens and solutions ~25: 0.65x HFLM's speed when shared).
        if len(idx) > 1 and len(ctx) >= max(len(requests[i][2]) for i in idx):
            buckets[len(ctx)].append(idx)
    shared = [b for b in buckets.values() if len(b) >= min_bucket]
    in_shared = {i for bucket in shared for idx in bucket for i in idx}
    return shared, [i for i in range(len(requests)) if i not in in_shared]


class SharedContextLM(HFLM):
    """HFLM whose loglikelihood runs a context shared by several requests once.

    Documents are batched by context length (contexts of one length need no padding, so the
    batch's cache is exact for every row); full task sets have many documents per length."""

    def _forward_with_cache(self, ids: torch.Tensor, cache=None, last_only: bool = False):
        """Logits (of the last position only with ``last_only``) and the cache after ``ids``.
        Both cache kinds (transformers' key/value caches, our students' MixerCache) can select
        batch rows."""
        if not hasattr(self, "_cache_name"):  # once: inspect is slow next to a small forward
            self._cache_name = _cache_argument(self.model)
        name = self._cache_name
        kwargs = {name: cache, "use_cache": True}
        if last_only:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            out = self.model(input_ids=ids, **kwargs)
        return out.logits, getattr(out, name)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        shared, plain = plan_requests(requests, self.max_length)
        if shared:  # contexts whose state is too large to copy per choice go one row per request
            large = [b for b in shared if self._state_row_bytes(len(requests[b[0][0]][1])) > self.max_shared_row_bytes]
            if large:
                shared = [b for b in shared if all(b is not x for x in large)]
                plain = sorted(plain + [i for b in large for idx in b for i in idx])
        results: list = [None] * len(requests)
        if plain and self.project_scored_only and self._split_head() is not None:
            # one forward per row as HFLM, but the language-model head only at the scored positions
            fits = [i for i in plain if 0 < len(requests[i][2]) <= self.max_length and len(requests[i][1]) > 0]
            for i, answer in self._score_plain(requests, fits, disable_tqdm).items():
                results[i] = answer
            plain = [i for i in plain if results[i] is None]
        if plain:  # HFLM's path, which also feeds lm-eval's request cache for these
            for i, r in zip(plain, super()._loglikelihood_tokens([requests[i] for i in plain], disable_tqdm,
                                                                override_bs)):
                results[i] = r
        if not shared:
            return results
        per_batch = self.batch_size if isinstance(self.batch_size, int) else 8  # documents per batch
        pbar = tqdm(total=sum(len(idx) for bucket in shared for idx in bucket),
                    disable=disable_tqdm or self.rank != 0, desc="Scoring shared-context requests")
        # longest contexts first, as HFLM: a memory problem shows at once, time estimates are upper bounds
        for bucket in sorted(shared, key=lambda b: -len(requests[b[0][0]][1])):
            row_bytes = self._state_row_bytes(len(requests[bucket[0][0]][1]))
            for part in batch_documents([len(idx) for idx in bucket], per_batch, row_bytes, self.state_budget_bytes):
                docs = bucket[part]
                answers = self._score_docs([[requests[i] for i in idx] for idx in docs])
                for i, answer in zip((i for idx in docs for i in idx), answers):
                    results[i] = answer
                    request_str = requests[i][0]
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    pbar.update(1)
        pbar.close()
        return results

    state_budget_bytes = STATE_BUDGET_BYTES
    max_shared_row_bytes = MAX_SHARED_ROW_BYTES

    def _state_row_bytes(self, context_len: int) -> int:
        """Bytes of one row's cache after ``context_len`` tokens. Measured once from the real
        cache after 1 and 2 tokens (every cache here is affine in the length: constant for a
        recurrent state, a key/value row per token for softmax) and extended to the length."""
        if not hasattr(self, "_state_line"):
            sizes = []
            for n in (1, 2):
                _, cache = self._forward_with_cache(torch.ones(1, n, dtype=torch.long, device=self.device),
                                                    last_only=True)
                sizes.append(tensor_bytes(cache))
            self._state_line = (sizes[0], sizes[1] - sizes[0])
        first, step = self._state_line
        return first + step * (context_len - 1)

    # False: requests that share no context take HFLM's own path (benchmarks/eval_speed.py
    # --compare-plain measures both on the same requests)
    project_scored_only = True

    def _split_head(self):
        """(body, head) of a causal LM made of a decoder (``.model``, returning hidden states)
        and an output projection (``get_output_embeddings()``): transformers' Llama and our
        students both are. None for other models, which keep HFLM's path."""
        if not hasattr(self, "_body_head"):
            body = getattr(self.model, "model", None)
            head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
            self._body_head = (body, head) if isinstance(body, torch.nn.Module) and head is not None else None
        return self._body_head

    def _score_plain(self, requests, idx: list[int], disable_tqdm: bool = False) -> dict[int, tuple[float, bool]]:
        """(log-likelihood, greedy) of the requests ``idx`` that share no context, as HFLM
        scores them (context + continuation[:-1] in one row, right-padded, rows sorted by length,
        ``batch_size`` rows per forward, left-truncated to the model's window), except that the
        output projection and the log-softmax run only at each row's continuation positions:
        HFLM projects every position onto the 49K-token vocabulary (about a fifth of the
        teacher's forward FLOPs) and log-softmaxes all of them."""
        body, head = self._split_head()
        per_batch = self.batch_size if isinstance(self.batch_size, int) else 8
        rows = []
        for i in idx:
            _, ctx, cont = requests[i]
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]
            rows.append((i, inp, cont))
        rows.sort(key=lambda r: -len(r[1]))  # longest first: equal lengths pad little, as HFLM
        out = {}
        pbar = tqdm(total=len(rows), disable=disable_tqdm or self.rank != 0, desc="Scoring requests")
        for start in range(0, len(rows), per_batch):
            batch = rows[start:start + per_batch]
            ids = torch.zeros(len(batch), len(batch[0][1]), dtype=torch.long, device=self.device)
            row_of, col_of = [], []
            for r, (_, inp, cont) in enumerate(batch):
                ids[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                row_of += [r] * len(cont)
                col_of += range(len(inp) - len(cont), len(inp))
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                hidden = body(input_ids=ids, use_cache=False).last_hidden_state
                logits = head(hidden[torch.tensor(row_of), torch.tensor(col_of)])  # [scored tokens, vocab]
            logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            target = torch.tensor([t for _, _, cont in batch for t in cont], dtype=torch.long, device=logp.device)
            token_ll = logp.gather(1, target[:, None])[:, 0]
            hit = logp.argmax(-1) == target
            at = 0
            for i, _, cont in batch:
                n = len(cont)
                answer = (float(token_ll[at:at + n].sum()), bool(hit[at:at + n].all()))
                at += n
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                pbar.update(1)
        pbar.close()
        return out

    def _score_docs(self, docs) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of every continuation of ``docs``: lists of requests, one
        list per context, all contexts of the same length.

        The first token of a continuation is predicted by its context's last position; the rest
        by one batched forward of every continuation[:-1] from copies of its context's cache.
        Right padding after a shorter continuation is harmless: a causal model's earlier
        positions never see it, and only those are read."""
        ctx = torch.tensor([doc[0][1] for doc in docs], dtype=torch.long, device=self.device)
        first_logits, cache = self._forward_with_cache(ctx, last_only=True)  # [docs, 1, vocab]
        owner = [d for d, doc in enumerate(docs) for _ in doc]  # the context row of each continuation
        conts = [cont for doc in docs for _, _, cont in doc]
        rest_len = max(map(len, conts)) - 1
        rest_logits = None
        if rest_len > 0:
            cache.batch_select_indices(torch.tensor(owner, device=self.device))
            ids = torch.zeros(len(conts), rest_len, dtype=torch.long, device=self.device)
            for row, cont in enumerate(conts):
                ids[row, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
            rest_logits, _ = self._forward_with_cache(ids, cache)
        answers = []
        for row, cont in enumerate(conts):
            logits = first_logits[owner[row], -1:]
            if len(cont) > 1:
                logits = torch.cat([logits, rest_logits[row, : len(cont) - 1]])
            logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            target = torch.tensor(cont, dtype=torch.long, device=logp.device)
            greedy = bool((logp.argmax(-1) == target).all())
            answers.append((float(logp.gather(1, target[:, None]).sum()), greedy))
        return answers
