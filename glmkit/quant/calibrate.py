"""Calibrated INT8/INT4 quantization (GPTQ): the same checkpoint format as round-to-nearest, less error.

Round-to-nearest (glmkit.quant.formats) rounds every weight on its own. GPTQ (Frantar et al., 2022) rounds the columns
of a layer one at a time and moves each rounding error onto the columns not yet rounded, weighted by the inverse
Hessian H = X^T X of the layer's inputs X on calibration text, so the layer's *output* on text like it stays
close. The scales and zeros are still chosen per group (or per row) as round-to-nearest chooses them, so a
calibrated checkpoint is an ordinary glmkit quantized checkpoint: same kernels, same speed, loads the same way.

On the bundled glm-tiny (held-out Tang poems) the relative logits error of INT4 group 32 drops from 0.51x to
about 0.35x that of ChatGLM-6B's per-row scheme (benchmarks/accuracy.py).

It needs the float model in memory (the 6B model in bf16: ~12.5 GB) and, per layer, a forward pass over the
calibration tokens plus a Cholesky factorisation per linear: minutes for a 6B model on a laptop CPU, so it is a
`glmkit quantize --calibrate` step whose output is saved, not a quantize-on-load option. Layers are processed in
order, each on the inputs produced by the already-quantized layers before it, as in the paper.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from glmkit.core.atomic import torch_save, write_json
from glmkit.quant import kernels
from glmkit.quant.formats import default_spec, effective_group_size, quantize_group
from glmkit.quant.kernels import release_freed_memory
from glmkit.quant.linear import QuantizedLinear
from glmkit.quant.transform import layer_linears, record_spec

CALIBRATION_TEXT = Path(__file__).parents[1] / "assets" / "calibration.txt"
DAMPING = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the Cholesky factorisation stable


# ------------------------------------------------------------------------------------------------ data


def calibration_batch(tokenizer, text: str | None = None, num_sequences: int = 16, seq_len: int = 256
                      ) -> torch.Tensor:
    """[num_sequences, seq_len] token ids: windows spread evenly over `text` (default: the bundled bilingual
    sample of public-domain poems and prose), laid out as the family's prompts are: ChatGLM-6B puts
    [gMASK] <sop> after the prompt (here: mid-window), later families before it."""
    text = CALIBRATION_TEXT.read_text(encoding="utf-8") if text is None else text
    ids = tokenizer.encode(text, add_special_tokens=False)
    body = seq_len - 2
    if body < 8:
        raise ValueError(f"seq_len must be at least 10, got {seq_len}")
    if len(ids) < body:
        raise ValueError(f"the calibration text has {len(ids)} tokens; need at least {body} (seq_len - 2)")
    starts = torch.linspace(0, len(ids) - body, num_sequences).long().tolist()
    specials = [tokenizer.gmask_token_id, tokenizer.sop_token_id]
    rows = []
    for s in starts:
        window = ids[s:s + body]
        if getattr(tokenizer, "family", None) == "chatglm":
            rows.append(window[:body // 2] + specials + window[body // 2:])
        else:
            rows.append(specials + window)
    return torch.tensor(rows)


# ------------------------------------------------------------------------------------------------ GPTQ


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, scheme: str, group_size: int | None = None,
                  symmetric: bool = False, block_size: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [N, K] float, hessian [K, K] (sum of x x^T over calibration inputs) -> q int8 [N, K], scale, zero in
    glmkit.quant.formats' schemes: rowwise = ChatGLM-6B's fp16 absmax scale per row; group = bf16 (scale, zero) per
    group, picked by quantize_group from the group's weights as updated by the errors of earlier columns."""
    n, k = w.shape
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    if H.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {tuple(H.shape)}")
    dead = torch.diagonal(H) == 0  # inputs never active in calibration: nothing to trade against, plain rounding
    H[dead, dead] = 1
    H.diagonal().add_(DAMPING * torch.diagonal(H).mean())
    # upper Cholesky factor of H^-1: row i holds how column i's error spreads over the columns after it
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    del H

    Q = torch.empty(n, k, dtype=torch.int8, device=W.device)
    if scheme == "rowwise":
        qmax = 2 ** (bits - 1) - 1
        scale16 = (W.abs().amax(dim=-1) / qmax).half()
        s_row = scale16.float()
        s_row = torch.where(s_row == 0, torch.ones_like(s_row), s_row)
        scales, zeros = scale16, None
        lo, hi = -qmax, qmax
    else:
        if bits != 4 or not group_size or k % group_size:
            raise ValueError(f"the group scheme is INT4 with group_size dividing {k}, got bits={bits}, "
                             f"group_size={group_size}")
        scales = torch.empty(n, k // group_size, dtype=torch.bfloat16, device=W.device)
        zeros = None if symmetric else torch.empty(n, k // group_size, dtype=torch.bfloat16, device=W.device)
        lo, hi = -8, 7
        block_size = -(-block_size // group_size) * group_size  # a group never straddles two blocks

    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        W1 = W[:, b0:b1].clone()
        E1 = torch.empty_like(W1)
        H1 = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if scheme == "rowwise":
                s, z = s_row, None
            elif col % group_size == 0:
                _, gs, gz = quantize_group(W1[:, i:i + group_size], group_size, symmetric, mse_fit=True)
                scales[:, col // group_size] = gs[:, 0]
                if zeros is not None:
                    zeros[:, col // group_size] = gz[:, 0]
                s = gs[:, 0].float()
                z = gz[:, 0].float() if gz is not None else None
            w_col = W1[:, i]
            q = torch.round((w_col - z) / s if z is not None else w_col / s).clamp_(lo, hi)
            Q[:, col] = q.to(torch.int8)
            deq = q * s + z if z is not None else q * s
            err = (w_col - deq) / H1[i, i]
            W1[:, i:].sub_(err[:, None] * H1[i, i:][None, :])
            E1[:, i] = err
        W[:, b1:].sub_(E1 @ Hinv[b0:b1, b1:])
    return Q, scales, zeros


# ------------------------------------------------------------------------------------------------ model level


class _BlockInputs(Exception):
    """Raised by a pre-hook on the first block to stop the forward once its inputs are captured."""


def _first_block_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[tuple, dict]:
    captured = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _BlockInputs

    handle = model.h[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(ids)
    except _BlockInputs:
        pass
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


class LayerProgress:
    """Per-layer progress of a calibration in a folder, so that a killed run resumes after its last finished layer
    and ends with the same bits as an uninterrupted one: after layer i, `layer-i.pt` (its rounded linears, as
    gptq_quantize returned them), `inputs.pt` (the next layer's inputs) and `progress.json` (layers done and a
    fingerprint of the model, the spec and the calibration ids), each written whole (glmkit.core.atomic). A folder
    made for other settings is started over."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint

    def done(self) -> int:
        path = self.folder / "progress.json"
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            if info.get("fingerprint") == self.fingerprint and isinstance(info.get("layers_done"), int):
                return info["layers_done"]
        except (OSError, ValueError):
            pass
        return 0

    def load(self, i: int) -> dict[str, tuple]:
        return torch.load(self.folder / f"layer-{i}.pt", map_location="cpu", weights_only=True)

    def inputs(self) -> list[torch.Tensor]:
        return torch.load(self.folder / "inputs.pt", map_location="cpu", weights_only=True)

    def save(self, i: int, layer: dict[str, tuple], xs: list[torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch_save(layer, self.folder / f"layer-{i}.pt")
        torch_save([x.cpu() for x in xs], self.folder / "inputs.pt")
        write_json(self.folder / "progress.json", {"fingerprint": self.fingerprint, "layers_done": i + 1})


def calibration_fingerprint(model: nn.Module, ids: torch.Tensor, spec: dict) -> str:
    """What a calibration's result depends on besides the weights' values: config, dtype, spec, ids, and a sample
    of the weights (the first and last rows of every parameter)."""
    h = hashlib.sha256()
    h.update(json.dumps([model.config.to_dict(), str(model.dtype), spec], sort_keys=True, default=str).encode())
    h.update(ids.cpu().numpy().tobytes())
    for name, p in model.state_dict().items():
        t = p.detach().reshape(p.shape[0], -1) if p.dim() else p.detach().reshape(1)
        edge = torch.cat([t[:1], t[-1:]]).float().cpu()
        h.update(name.encode() + edge.numpy().tobytes())
    return h.hexdigest()[:32]


@torch.no_grad()
def quantize_calibrated(model: nn.Module, ids: torch.Tensor, bits: int, group_size: int | None = None,
                        scheme: str | None = None, symmetric: bool = False, batch_size: int = 4,
                        progress: bool = True, progress_dir: str | Path | None = None) -> nn.Module:
    """Quantizes the four linears of every layer of a float model in place with GPTQ on calibration token ids
    [n, T] (see calibration_batch). Same spec arguments and result format as glmkit.quant.transform.quantize_model.
    progress_dir: save progress there after each layer and resume from it (LayerProgress)."""
    spec = default_spec(bits, group_size, scheme, symmetric)
    linears = {id(m): (parent, attr) for _, parent, attr, m in layer_linears(model)}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            raise ValueError("the model is already quantized")
    if not linears:
        raise ValueError("found no layer linears to quantize")
    if getattr(model, "prefix_encoder", None) is not None:
        raise ValueError("calibrate the base model, then load the P-tuning prefix on the quantized model "
                         "(load_model(dst, adapter=...))")
    model.eval()
    dtype = model.dtype
    chunks = [_first_block_inputs(model, ids[a:a + batch_size]) for a in range(0, ids.shape[0], batch_size)]
    xs = [args[0] for args, _ in chunks]
    saved = LayerProgress(Path(progress_dir), calibration_fingerprint(model, ids, spec)) if progress_dir else None
    start = saved.done() if saved is not None else 0
    if start:
        xs = [x.to(ids.device) for x in saved.inputs()]

    from tqdm.auto import tqdm

    for i, block in enumerate(tqdm(model.h, desc="GPTQ", unit="layer", disable=not progress)):
        targets = [m for m in block.modules() if id(m) in linears]
        names = {id(m): n for n, m in block.named_modules()}
        if i < start:  # rounded by the run that was interrupted: take its result as it is
            rounded = saved.load(i)
            for m in targets:
                _replace(m, linears[id(m)], spec, dtype, *rounded[names[id(m)]])
            continue
        hessians = {id(m): torch.zeros(m.in_features, m.in_features, device=m.weight.device) for m in targets}

        def accumulate(module, inputs, output):
            x = inputs[0].reshape(-1, module.in_features).float()
            hessians[id(module)].addmm_(x.t(), x)

        handles = [m.register_forward_hook(accumulate) for m in targets]
        try:
            for x, (args, kwargs) in zip(xs, chunks):
                block(x, *args[1:], **kwargs)
        finally:
            for h in handles:
                h.remove()
        rounded = {}
        for m in targets:
            group = effective_group_size(m.in_features, spec["group_size"]) if spec["scheme"] == "group" else None
            q, s, z = gptq_quantize(m.weight, hessians.pop(id(m)), spec["bits"], spec["scheme"], group,
                                    spec["symmetric"])
            q, s, z = q.cpu(), s.cpu(), z.cpu() if z is not None else None  # the portable form is built on CPU
            bias = m.bias.detach().cpu().clone() if m.bias is not None else None
            rounded[names[id(m)]] = (q, s, z, bias)
            _replace(m, linears[id(m)], spec, dtype, q, s, z, bias)
            del m
        release_freed_memory()
        xs = [block(x, *args[1:], **kwargs) for x, (args, kwargs) in zip(xs, chunks)]  # through the quantized layer
        if saved is not None:
            saved.save(i, rounded, xs)
    record_spec(model, spec)
    return model


def _replace(m: nn.Linear, where: tuple[nn.Module, str], spec: dict, dtype: torch.dtype, q: torch.Tensor,
             s: torch.Tensor, z: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """Puts the QuantizedLinear holding GPTQ's result (q, s, z) and the float bias in the place of linear m."""
    parent, attr = where
    q_mod = QuantizedLinear(m.in_features, m.out_features, m.bias is not None, bits=spec["bits"],
                            scheme=spec["scheme"], group_size=spec["group_size"], symmetric=spec["symmetric"],
                            dtype=dtype)
    q_mod.load_portable(kernels.pack_int4(q) if spec["bits"] == 4 else q, s, z)
    if bias is not None:
        q_mod.load_weight_tensor("bias", bias)
    setattr(parent, attr, q_mod.to(m.weight.device))


def calibrate_and_quantize(model: nn.Module, tokenizer, bits: int, group_size: int | None = None,
                           scheme: str | None = None, symmetric: bool = False, text: str | None = None,
                           num_sequences: int = 16, seq_len: int = 256, progress: bool = True,
                           progress_dir: str | Path | None = None) -> nn.Module:
    """quantize_calibrated on calibration_batch(tokenizer, text, ...): the one call `glmkit quantize
    --calibrate` makes."""
    ids = calibration_batch(tokenizer, text, num_sequences, seq_len).to(model.device)
    return quantize_calibrated(model, ids, bits, group_size, scheme, symmetric, progress=progress,
                               progress_dir=progress_dir)
