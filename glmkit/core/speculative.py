"""Self-speculative decoding with GLM-4.5's multi-token-prediction (MTP) layers (load_model(..., mtp=True)).

Each step the MTP layer drafts `draft_tokens` tokens from the main model's last hidden state (the MTP layer run on its
own output for the 2nd.. draft, as vLLM chains it), and the main model verifies the last accepted token and all
drafts in one forward: drafts are accepted while they equal the main model's greedy choice, and the main model's
token after the last accepted draft comes free. So the output is plain greedy decoding's, token for token; only the
number of main-model forwards changes. Rejected drafts need no cache rollback: the next forward rewrites their KV
cache slots and attention reads only slots up to the last one written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MTPStats:
    steps: int = 0  # main-model forwards after the prefill (each verifies one block of drafts)
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """Accepted drafts / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """New tokens per main-model forward after the prefill (1.0 = no gain over plain decoding)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


def _causal(start: int, n: int, device) -> torch.Tensor:
    """Bool [1, 1, n, start + n]: the tokens at cache slots start.. start+n-1 see every slot up to their own."""
    rows = torch.arange(start, start + n, device=device)
    return (torch.arange(start + n, device=device)[None, :] <= rows[:, None])[None, None]


def _draft(model, tokens: torch.Tensor, hidden: torch.Tensor, start: int, k: int) -> list[int]:
    """MTP over cache slots start.. (token t+1 and the main hidden state of slot t each), then k - 1 chained steps."""
    m = tokens.shape[1]
    device = tokens.device
    positions = torch.arange(start, start + m, device=device)
    logits, h = model.mtp_forward(0, tokens, hidden, positions[None], _causal(start, m, device), input_pos=positions)
    drafts = [int(logits[0, -1].argmax())]
    h = h[:, -1:]
    for j in range(1, k):
        p = torch.tensor([start + m + j - 1], device=device)
        logits, h = model.mtp_forward(j % len(model.mtp), torch.tensor([[drafts[-1]]], device=device), h, p[None],
                                      None, input_pos=p)
        drafts.append(int(logits[0, -1].argmax()))
    return drafts


@torch.no_grad()
def generate_mtp(model, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id=None,
                 draft_tokens: int | None = None) -> tuple[torch.Tensor, MTPStats]:
    """Greedy decoding of one sequence with MTP drafts: (new token ids [1, N], MTPStats). The tokens equal
    model.generate(input_ids, max_new_tokens=..., eos_token_id=...) (greedy). eos_token_id: an id or a list (None:
    the config's; [] to never stop early). draft_tokens: drafts per step (default: one per MTP layer)."""
    if getattr(model, "mtp", None) is None:
        raise ValueError("the model has no MTP layers: load it with glmkit.load_model(..., mtp=True)")
    ids = torch.as_tensor(input_ids, device=model.device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"generate_mtp decodes one sequence: input_ids [1, T], got shape {tuple(ids.shape)}")
    k = draft_tokens or len(model.mtp)
    if k < 1 or max_new_tokens < 1:
        raise ValueError("draft_tokens and max_new_tokens must be >= 1")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    T, device = ids.shape[1], ids.device
    stats = MTPStats()
    model.setup_cache(1, T + max_new_tokens + k + 1)
    try:
        positions = torch.arange(T, device=device)
        logits, hidden = model(ids, positions[None], _causal(0, T, device), input_pos=positions, return_hidden=True)
        out = [int(logits[0, -1].argmax())]
        if out[-1] in eos or max_new_tokens == 1:
            return torch.tensor([out], device=device), stats
        # slot t of the MTP layer reads token t+1: the prompt shifted by one, then the first new token
        drafts = _draft(model, torch.cat((ids[:, 1:], torch.tensor([out], device=device)), dim=1), hidden, 0, k)
        cur = T  # the cache slot of out[-1], the newest token (not yet in the main model's cache)
        while True:
            block = torch.tensor([[out[-1], *drafts]], device=device)
            n = block.shape[1]
            slots = torch.arange(cur, cur + n, device=device)
            logits, hidden = model(block, slots[None], _causal(cur, n, device), input_pos=slots, return_hidden=True)
            greedy = logits[0].argmax(-1).tolist()
            a = 0
            while a < len(drafts) and drafts[a] == greedy[a]:
                a += 1
            stats.steps += 1
            stats.drafted += len(drafts)
            stats.accepted += a
            for t in greedy[:a + 1]:  # the accepted drafts and the main model's next token
                out.append(t)
                if t in eos or len(out) >= max_new_tokens:
                    return torch.tensor([out], device=device), stats
            drafts = _draft(model, torch.tensor([greedy[:a + 1]], device=device), hidden[:, :a + 1], cur, k)
            cur += a + 1
    finally:
        model.clear_cache()
