#!/usr/bin/env python3
"""Generate reference fixtures for the loss functions in ``src/loss.rs``.

Writes, under ``tests/fixtures/loss/``:

* ``ctc.safetensors`` - ``torch.nn.functional.ctc_loss`` values and gradients (cases ``a`` and ``b``)
* ``ce.safetensors``  - ``torch.nn.functional.cross_entropy`` values and gradients
* ``README.md``       - what every tensor is

All tensors are float64 (int64 for ids and lengths) and batch-first: ``log_probs`` / ``logits`` are
[B, T, C] as klspeech's model emits them; torch's ctc_loss wants [T, B, C], so the generator
transposes for the call and transposes the gradients back.

Run from the repository root (CPU only, well under a second):

    /work/venv/bin/python tools/gen_loss_fixtures.py

Deterministic (fixed torch seeds; the outputs are a pure function of torch's CPU kernels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "loss"


def np64(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy())


def padded_targets(targets: list[list[int]]) -> torch.Tensor:
    """[B, Lmax] int64, rows padded with 0 past their target length (torch ignores the padding)."""
    lmax = max(1, max(len(t) for t in targets))
    out = torch.zeros(len(targets), lmax, dtype=torch.int64)
    for b, t in enumerate(targets):
        out[b, : len(t)] = torch.tensor(t, dtype=torch.int64)
    return out


def ctc_case(name: str, out: dict, *, seed: int, B: int, T: int, C: int, blank: int,
             targets: list[list[int]], input_lengths: list[int], runs: list[tuple[str, bool]]) -> None:
    """One CTC case; ``runs`` lists (reduction, zero_infinity) pairs to record.

    Stored per run under ``{name}.{tag}.`` with tag = reduction, prefixed by ``zeroinf.`` /
    ``noinf.`` in case ``b``:
      loss            torch's returned value ([1] for mean/sum, [B] for none)
      grad_log_probs  d(loss, summed if none) / d log_probs, log_probs a leaf   [B, T, C]
      grad_logits     d(loss, summed if none) / d logits through log_softmax    [B, T, C]
    """
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(B, T, C, generator=g, dtype=torch.float64)).contiguous()
    log_probs = logits.log_softmax(-1)
    tgt = padded_targets(targets)
    tl = torch.tensor([len(t) for t in targets], dtype=torch.int64)
    il = torch.tensor(input_lengths, dtype=torch.int64)
    out[f"{name}.logits"] = np64(logits)
    out[f"{name}.log_probs"] = np64(log_probs)
    out[f"{name}.targets"] = np64(tgt)
    out[f"{name}.target_lengths"] = np64(tl)
    out[f"{name}.input_lengths"] = np64(il)
    out[f"{name}.blank"] = np.array([blank], dtype=np.int64)

    for reduction, zero_inf in runs:
        tag = reduction if name == "a" else f"{'zeroinf' if zero_inf else 'noinf'}.{reduction}"
        prefix = f"{name}.{tag}"

        # w.r.t. log_probs as a leaf
        lp = log_probs.detach().clone().requires_grad_(True)
        loss = F.ctc_loss(lp.transpose(0, 1), tgt, il, tl, blank=blank, reduction=reduction,
                          zero_infinity=zero_inf)
        (loss.sum() if reduction == "none" else loss).backward()
        out[f"{prefix}.loss"] = np64(loss)
        out[f"{prefix}.grad_log_probs"] = np64(lp.grad)

        # w.r.t. the pre-softmax logits
        x = logits.detach().clone().requires_grad_(True)
        loss2 = F.ctc_loss(x.log_softmax(-1).transpose(0, 1), tgt, il, tl, blank=blank,
                           reduction=reduction, zero_infinity=zero_inf)
        (loss2.sum() if reduction == "none" else loss2).backward()
        assert torch.equal(loss.detach().isnan(), loss2.detach().isnan())
        out[f"{prefix}.grad_logits"] = np64(x.grad)


def ctc_fixtures() -> dict:
    out: dict = {}
    # Case a: blank 0, padded frames in utterances 1 and 2, repeated labels (2,2) and (5,5).
    ctc_case("a", out, seed=1234, B=3, T=12, C=6, blank=0,
             targets=[[1, 2, 2, 3], [4, 1, 4], [5, 5]], input_lengths=[12, 9, 7],
             runs=[("mean", False), ("sum", False), ("none", False)])
    # Case b: blank = C-1 = 4. Utterance 0 needs 4 labels + 3 blanks between repeats = 7 > 5
    # frames: impossible, loss inf (NaN gradient in torch) or 0 (zero gradient) with zero_infinity.
    # Utterance 1 is possible and has one padded frame.
    ctc_case("b", out, seed=99, B=2, T=5, C=5, blank=4,
             targets=[[1, 1, 1, 1], [3, 1]], input_lengths=[5, 4],
             runs=[("none", False), ("mean", False), ("none", True), ("mean", True), ("sum", True)])
    return out


def ce_fixtures() -> dict:
    g = torch.Generator().manual_seed(7)
    logits = 1.5 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1, 1, 2], dtype=torch.int64)
    out = {"logits": np64(logits), "targets": np64(targets)}
    for tag, eps in [("plain", 0.0), ("smooth", 0.1)]:
        x = logits.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(x, targets, label_smoothing=eps)
        loss.backward()
        out[f"{tag}.label_smoothing"] = np.array([eps], dtype=np.float64)
        out[f"{tag}.loss"] = np64(loss)
        out[f"{tag}.grad_logits"] = np64(x.grad)
    return out


def shape_table(tensors: dict) -> str:
    rows = ["| tensor | dtype | shape |", "| --- | --- | --- |"]
    for k in sorted(tensors):
        v = tensors[k]
        rows.append(f"| `{k}` | {v.dtype} | {list(v.shape)} |")
    return "\n".join(rows)


README = """# Loss fixtures

Generated by `tools/gen_loss_fixtures.py` with torch {torch} and numpy {numpy} (CPU, float64):

```
/work/venv/bin/python tools/gen_loss_fixtures.py
```

Layout is batch-first everywhere: `log_probs` / `logits` are [B, T, C]; the generator transposes
to torch's [T, B, C] for `F.ctc_loss` and transposes gradients back. Ids and lengths are int64.

## ctc.safetensors (`torch.nn.functional.ctc_loss`)

Per case `{{a,b}}`:

* `logits` [B, T, C] = `2 * randn` (seeded generator); `log_probs = logits.log_softmax(-1)`.
* `targets` [B, Lmax] int64, zero-padded past `target_lengths[b]` (padding is not part of the
  target); `input_lengths` [B]; `blank` [1].
* Per run `prefix`: `prefix.loss` (torch's return value: its 0-d scalar stored as [1] for
  mean/sum, [B] for none),
  `prefix.grad_log_probs` = d(loss, `.sum()` if none) / d`log_probs` with `log_probs` a leaf, and
  `prefix.grad_logits` = the same through `log_softmax` w.r.t. `logits`.

Case `a`: B=3, T=12, C=6, blank=0, targets `[1,2,2,3]`, `[4,1,4]`, `[5,5]`, input lengths
`[12, 9, 7]`; runs `a.mean`, `a.sum`, `a.none` (zero_infinity=False).

Case `b`: B=2, T=5, C=5, blank=4 (= C-1), targets `[1,1,1,1]` (needs 7 frames > 5: impossible)
and `[3,1]`, input lengths `[5, 4]`. Runs `b.noinf.none`, `b.noinf.mean` (zero_infinity=False:
loss inf, and torch's gradient is NaN on every valid frame of utterance 0), `b.zeroinf.none`,
`b.zeroinf.mean`, `b.zeroinf.sum` (zero_infinity=True: loss 0 and zero gradient for utterance 0).

## ce.safetensors (`torch.nn.functional.cross_entropy`, reduction mean)

* `logits` [5, 4] = `1.5 * randn`, `targets` [5] int64.
* `plain.*` label_smoothing 0.0, `smooth.*` label_smoothing 0.1 (also stored as
  `{{plain,smooth}}.label_smoothing` [1]): `loss` [1] (torch's 0-d scalar) and `grad_logits` [5, 4].

## Tensors

{tables}
"""


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ctc = ctc_fixtures()
    ce = ce_fixtures()
    save_file(ctc, str(OUT / "ctc.safetensors"), metadata={"torch": torch.__version__})
    save_file(ce, str(OUT / "ce.safetensors"), metadata={"torch": torch.__version__})
    tables = "### ctc.safetensors\n\n" + shape_table(ctc) + "\n\n### ce.safetensors\n\n" + shape_table(ce)
    (OUT / "README.md").write_text(README.format(torch=torch.__version__, numpy=np.__version__, tables=tables))
    print("a.none.loss", ctc["a.none.loss"], "b.noinf.none.loss", ctc["b.noinf.none.loss"])
    print("b.zeroinf.none.loss", ctc["b.zeroinf.none.loss"], "ce", ce["plain.loss"], ce["smooth.loss"])
    for f in ("ctc.safetensors", "ce.safetensors"):
        print(f, (OUT / f).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
