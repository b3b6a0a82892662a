"""The one generation module: sampling, KV-cache prefill/decode, streaming. Chat, CLI, server and UI all use it.

Order of score processing per step (as transformers does it): repetition penalty -> presence/frequency penalty
(OpenAI's, over the generated tokens only, as vLLM applies them) -> caller's logits processors (e.g. ChatGLM's NaN/inf
guard, appended after the defaults) -> (sampling only) temperature -> top-k -> top-p -> multinomial; greedy = argmax.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
HF_DEFAULT_MAX_LENGTH = 20  # transformers' default total length when neither limit is given


def new_token_budget(max_new_tokens: int | None, max_length: int | None, prompt_len: int) -> int:
    """Tokens to generate after a prompt of prompt_len, as transformers reads the two limits: max_new_tokens wins,
    capped by max_length (total) when both are given; neither = HF_DEFAULT_MAX_LENGTH total."""
    if max_new_tokens is None:
        return (max_length if max_length is not None else HF_DEFAULT_MAX_LENGTH) - prompt_len
    if max_length is not None:
        return min(max_new_tokens, max_length - prompt_len)
    return max_new_tokens


# ------------------------------------------------------------------------------------------------ sampling
def apply_repetition_penalty(input_ids: torch.Tensor, scores: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already present (prompt included), as transformers applies it."""
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, input_ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, input_ids, picked)


def apply_presence_frequency_penalty(generated: torch.Tensor, scores: torch.Tensor, presence: float = 0.0,
                                     frequency: float = 0.0) -> torch.Tensor:
    """OpenAI's penalties: each token already generated (generated [B, N]) loses `presence` once and `frequency`
    per occurrence: scores - frequency * count - presence * (count > 0)."""
    if (presence == 0.0 and frequency == 0.0) or generated.shape[1] == 0:
        return scores
    counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def warp(scores: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """temperature -> top-k -> top-p, returning filtered logits (-inf outside the kept set; at least one kept)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # keep the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def sample(scores: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """scores [B, V] -> next tokens [B]. temperature 0 (or do_sample=False) is greedy."""
    if not do_sample or temperature == 0:
        return scores.argmax(dim=-1)
    probs = warp(scores.float(), temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def invalid_score_guard(input_ids: torch.Tensor, scores: torch.Tensor, fallback_id: int = 5) -> torch.Tensor:
    """ChatGLM's InvalidScoreLogitsProcessor: NaN/inf scores become a certain pick of token `fallback_id`."""
    if torch.isnan(scores).any() or torch.isinf(scores).any():
        scores = torch.zeros_like(scores)
        scores[..., fallback_id] = 5e4
    return scores


# ------------------------------------------------------------------------------------------------ the loop
def next_positions(last: torch.Tensor, frozen: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of the token after `last`, the position ids of each row's latest token: [B] for 1-D positions,
    [B, 2] for 2D rotary (ChatGLM-6B, the original GLM: a row in Part B keeps the mask's position and counts its
    block position up). frozen [B] (1-D positions only, from `frozen_rows`): rows whose position stays put
    (GLM-130B's Part B after [MASK] / [sMASK]). Every decoding loop (generate_stream, beam search, the serving
    scheduler) steps positions with this one rule."""
    if last.dim() == 1:
        return last + 1 if frozen is None else torch.where(frozen, last, last + 1)
    in_part_b = last[:, 1] > 0
    pos = torch.where(in_part_b, last[:, 0], last[:, 0] + 1)
    block = torch.where(in_part_b, last[:, 1] + 1, last[:, 1])
    return torch.stack((pos, block), dim=1)


def frozen_rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """[B] bool: the prompts whose generated tokens keep one position (the model's `frozen_position_rows`, GLM-130B
    with a [MASK] / [sMASK] blank), or None when the model has no such rows. Pass it to `next_positions`."""
    frozen = getattr(model, "frozen_position_rows", None)
    return frozen(input_ids, attention_mask) if frozen is not None else None


def _as_batch(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
    return input_ids.long()


@torch.inference_mode()
def generate_stream(model, input_ids, attention_mask: torch.Tensor | None = None, *,
                    max_new_tokens: int | None = None, max_length: int | None = None, do_sample: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                    seed: int | None = None, logits_processors: Iterable[LogitsProcessor] = (),
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yields the next token of every row ([B] LongTensor) per step; finished rows yield pad.

    attention_mask [B, T]: 1 = token, 0 = left padding. A row stops when it produces one of eos_token_id
    (default: the model's). max_length counts prompt + answer, as in transformers; max_new_tokens only the answer.
    presence_penalty / frequency_penalty: OpenAI's (see apply_presence_frequency_penalty), 0 = off.
    """
    cfg = model.config
    input_ids = _as_batch(input_ids).to(model.device)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.device).long()
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
    max_new_tokens = new_token_budget(max_new_tokens, max_length, T)
    if max_new_tokens <= 0:
        return
    if temperature < 0 or not 0 <= top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
        raise ValueError("need temperature >= 0, 0 <= top_p <= 1, top_k >= 0, repetition_penalty > 0")
    eos = cfg.eos_token_ids if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else
                                                         (eos[0] if eos else 0))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(int(seed))
    processors = list(logits_processors)

    positions = model.default_position_ids(input_ids, attention_mask)  # [B, T] or [B, 2, T]
    frozen = frozen_rows(model, input_ids, attention_mask)
    total = T + max_new_tokens
    tokens = torch.full((B, total), pad, dtype=torch.long, device=input_ids.device)
    tokens[:, :T] = input_ids
    key_valid = torch.zeros(B, total, dtype=torch.bool, device=input_ids.device)
    key_valid[:, :T] = attention_mask.bool()
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)

    if use_cache:
        model.setup_cache(B, total)
    try:
        prompt_mask = model.default_attention_mask(input_ids, attention_mask)  # [B, 1, T, T]
        if use_cache:
            mask = torch.zeros(B, 1, T, total, dtype=torch.bool, device=input_ids.device)
            mask[..., :T] = prompt_mask
            logits = model(input_ids, positions, mask, input_pos=torch.arange(T, device=input_ids.device),
                           last_logits_only=True)
        else:
            logits = model(input_ids, positions, prompt_mask, last_logits_only=True)
        last_pos = positions[..., -1]
        for step in range(max_new_tokens):
            cur = T + step
            scores = logits[:, -1, :].float()
            seen = tokens[:, :cur]
            scores = apply_repetition_penalty(seen, scores, repetition_penalty)
            scores = apply_presence_frequency_penalty(tokens[:, T:cur], scores, presence_penalty, frequency_penalty)
            for proc in processors:
                scores = proc(seen, scores)
            nxt = sample(scores, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            tokens[:, cur] = nxt
            key_valid[:, cur] = True
            yield nxt
            finished |= torch.isin(nxt, eos_t)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            last_pos = next_positions(last_pos, frozen)
            if use_cache:
                mask = key_valid[:, None, None, :].clone()  # (B, 1, 1, total)
                mask[..., cur + 1:] = False
                logits = model(nxt[:, None], last_pos[..., None], mask,
                               input_pos=torch.tensor([cur], device=input_ids.device))
            else:
                full = tokens[:, : cur + 1]
                logits = model(full, model.default_position_ids(full, key_valid[:, : cur + 1].long()),
                               model.default_attention_mask(full, key_valid[:, : cur + 1].long()),
                               last_logits_only=True)
    finally:
        if use_cache:
            model.clear_cache()


def generate(model, input_ids, attention_mask: torch.Tensor | None = None, num_beams: int = 1,
             **kwargs) -> torch.Tensor:
    """The new tokens [B, N] (rows that stopped early are padded); same arguments as generate_stream, plus
    num_beams > 1 for beam search (deterministic; sampling arguments are then not allowed)."""
    if num_beams > 1:
        if kwargs.pop("do_sample", False):
            raise ValueError("beam search with sampling is not supported: use num_beams=1 or do_sample=False")
        for unused in ("temperature", "top_p", "top_k", "seed", "use_cache"):
            kwargs.pop(unused, None)
        if kwargs.pop("presence_penalty", 0.0) or kwargs.pop("frequency_penalty", 0.0):
            raise ValueError("presence/frequency penalties are for sampling and greedy decoding, not beam search")
        return beam_search(model, input_ids, attention_mask, num_beams=num_beams, **kwargs)
    steps = list(generate_stream(model, input_ids, attention_mask, **kwargs))
    B = _as_batch(input_ids).shape[0]
    if not steps:
        return torch.zeros(B, 0, dtype=torch.long)
    return torch.stack(steps, dim=1).cpu()


@torch.inference_mode()
def beam_search(model, input_ids, attention_mask: torch.Tensor | None = None, *, num_beams: int = 4,
                max_new_tokens: int | None = None, max_length: int | None = None,
                eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                length_penalty: float = 1.0, early_stopping: bool = False, repetition_penalty: float = 1.0,
                logits_processors: Iterable[LogitsProcessor] = ()) -> torch.Tensor:
    """Beam search as transformers runs it (log-softmax scores, 2·num_beams candidates per step, finished
    hypotheses scored sum_logprobs / generated_len ** length_penalty). Returns new tokens [B, N], pad-filled."""
    batch = _as_batch(input_ids)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    cfg = model.config
    eos = cfg.eos_token_ids if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    rows = []
    for b in range(batch.shape[0]):
        row = batch[b]
        if attention_mask is not None:
            row = row[attention_mask[b].bool()]
        rows.append(_beam_search_row(model, row[None], num_beams, max_new_tokens, max_length, eos, length_penalty,
                                     early_stopping, repetition_penalty, list(logits_processors)))
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _beam_search_row(model, ids, num_beams, max_new_tokens, max_length, eos, length_penalty, early_stopping,
                     repetition_penalty, processors) -> list[int]:
    device = model.device
    ids = ids.to(device)
    T = ids.shape[1]
    max_new_tokens = new_token_budget(max_new_tokens, max_length, T)
    if max_new_tokens <= 0:
        return []
    nb, total = num_beams, T + max_new_tokens
    seqs = ids.expand(nb, T).clone()
    beam_scores = torch.full((nb,), -1e9, device=device)
    beam_scores[0] = 0.0  # all beams start identical: only one may expand at first
    finished: list[tuple[float, list[int]]] = []
    positions = model.default_position_ids(seqs)
    frozen = frozen_rows(model, seqs)
    model.setup_cache(nb, total)
    try:
        mask = torch.zeros(nb, 1, T, total, dtype=torch.bool, device=device)
        mask[..., :T] = model.default_attention_mask(seqs)
        logits = model(seqs, positions, mask, input_pos=torch.arange(T, device=device), last_logits_only=True)
        last_pos = positions[..., -1]
        for step in range(max_new_tokens):
            cur = T + step
            scores = logits[:, -1].float().log_softmax(dim=-1)
            scores = apply_repetition_penalty(seqs, scores, repetition_penalty)
            for proc in processors:
                scores = proc(seqs, scores)
            V = scores.shape[-1]
            cand = (scores + beam_scores[:, None]).view(-1)
            top_scores, top_idx = torch.topk(cand, max(2, 1 + len(eos)) * nb)
            next_beams, next_tokens, next_scores = [], [], []
            for rank, (sc, ix) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
                beam, tok = divmod(ix, V)
                if tok in eos:
                    if rank < nb:  # a finished hypothesis, scored by its generated length
                        gen = seqs[beam, T:].tolist()
                        finished.append((sc / ((len(gen) + 1) ** length_penalty), gen + [tok]))
                    continue
                next_beams.append(beam)
                next_tokens.append(tok)
                next_scores.append(sc)
                if len(next_beams) == nb:
                    break
            finished.sort(key=lambda h: h[0], reverse=True)
            del finished[nb:]
            if len(finished) >= nb:
                best_possible = max(next_scores) / ((cur + 1 - T) ** length_penalty)
                if early_stopping or finished[-1][0] >= best_possible:
                    return finished[0][1]
            index = torch.tensor(next_beams, device=device)
            seqs = torch.cat([seqs[index], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
            beam_scores = torch.tensor(next_scores, device=device)
            model.reorder_cache(index)
            if step == max_new_tokens - 1:
                break
            last_pos = next_positions(last_pos[index], frozen)
            step_mask = torch.zeros(nb, 1, 1, total, dtype=torch.bool, device=device)
            step_mask[..., : cur + 1] = True
            logits = model(seqs[:, -1:], last_pos[..., None], step_mask, input_pos=torch.tensor([cur], device=device))
    finally:
        model.clear_cache()
    for sc, beam in zip(beam_scores.tolist(), range(nb)):  # running beams compete with the finished ones
        gen = seqs[beam, T:].tolist()
        finished.append((sc / (len(gen) ** length_penalty), gen))
    return max(finished, key=lambda h: h[0])[1]
