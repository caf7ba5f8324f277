#!/usr/bin/env python3
"""Generate reference fixtures for the optimizer (src/train/optim.rs).

Writes, under ``tests/fixtures/optim/``:

* ``optim.safetensors`` - float64 tensors:
  - ``config``: ``[lr, beta1, beta2, eps, weight_decay]``
  - ``init.<name>``: the three initial parameters
  - ``grad.<k>.<name>``: the fixed gradient of update ``k`` (0..4)
  - ``<run>.factors``: the lr factor applied to update ``k`` (``LambdaLR`` lambda at ``k``)
  - ``<run>.after.<k>.<name>``: parameters after update ``k``; ``<run>.final.<name>`` after the 5th
    for runs ``linear`` (``get_linear_schedule_with_warmup(warmup=2, total=5)``), ``cosine``
    (``get_cosine_schedule_with_warmup(warmup=2, total=5)``) and ``constant`` (no scheduler)
  - ``schedule.<kind>.w<W>.t<T>``: factors of ``transformers``' schedules at steps ``0..=T``
  - ``clip.in.<i>``, ``clip.<case>.norm`` (shape [1]), ``clip.<case>.out.<i>``:
    ``torch.nn.utils.clip_grad_norm_`` on three gradients for ``max_norm`` 1.0 (``small``,
    clips) and 100.0 (``big``, leaves them alone)
* ``README.md``

Run from the repository root (CPU only, well under a second):

    /work/venv/bin/python tools/gen_optim_fixtures.py

Deterministic (fixed torch seed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import transformers
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "optim"

LR, BETA1, BETA2, EPS, WD = 0.05, 0.9, 0.999, 1e-8, 0.01
STEPS, WARMUP = 5, 2
NAMES = {
    # name -> (shape, decays)
    "encoder.layers.0.attention.q_proj.weight": ((3, 4), True),
    "encoder.layers.0.layer_norm.weight": ((4,), False),
    "lm_head.weight": ((2, 3), True),
}


def make_data(gen: torch.Generator):
    init = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, (s, _) in NAMES.items()}
    grads = []
    for k in range(STEPS):
        step = {}
        for i, (n, (s, _)) in enumerate(NAMES.items()):
            scale = [1.0, 0.1, 3.0][i] * (1.0 + 0.5 * k)
            g = torch.randn(s, generator=gen, dtype=torch.float64) * scale
            if n == "lm_head.weight":
                g[0, 0] = 0.0  # a coordinate with zero gradient throughout: exercises eps
            step[n] = g
        grads.append(step)
    return init, grads


def run(init, grads, schedule: str | None):
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    groups = [
        {"params": [params[n] for n, (_, d) in NAMES.items() if d], "weight_decay": WD},
        {"params": [params[n] for n, (_, d) in NAMES.items() if not d], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(BETA1, BETA2), eps=EPS, foreach=False)
    if schedule == "linear":
        sched = get_linear_schedule_with_warmup(opt, WARMUP, STEPS)
    elif schedule == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, WARMUP, STEPS)
    else:
        sched = None
    factors, after = [], []
    for k in range(STEPS):
        factors.append(sched.lr_lambdas[0](k) if sched is not None else 1.0)
        assert opt.param_groups[0]["lr"] == LR * factors[-1]
        for n, p in params.items():
            p.grad = grads[k][n].clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        after.append({n: p.detach().clone() for n, p in params.items()})
    return torch.tensor(factors, dtype=torch.float64), after


def schedule_factors(kind: str, warmup: int, total: int) -> torch.Tensor:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if kind == "constant":
        s = get_constant_schedule_with_warmup(opt, warmup)
    elif kind == "linear":
        s = get_linear_schedule_with_warmup(opt, warmup, total)
    else:
        s = get_cosine_schedule_with_warmup(opt, warmup, total)
    return torch.tensor([float(s.lr_lambdas[0](k)) for k in range(total + 1)], dtype=torch.float64)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    init, grads = make_data(gen)
    t: dict[str, torch.Tensor] = {"config": torch.tensor([LR, BETA1, BETA2, EPS, WD], dtype=torch.float64)}
    t.update({f"init.{n}": v for n, v in init.items()})
    for k, g in enumerate(grads):
        t.update({f"grad.{k}.{n}": v for n, v in g.items()})
    for sched in ("linear", "cosine", "constant"):
        factors, after = run(init, grads, None if sched == "constant" else sched)
        t[f"{sched}.factors"] = factors
        for k, ps in enumerate(after):
            t.update({f"{sched}.after.{k}.{n}": v for n, v in ps.items()})
        t.update({f"{sched}.final.{n}": v.clone() for n, v in after[-1].items()})

    for kind in ("constant", "linear", "cosine"):
        for w, tot in ((3, 10), (0, 4), (5, 3), (2, 5), (1, 1)):
            t[f"schedule.{kind}.w{w}.t{tot}"] = schedule_factors(kind, w, tot)

    clip_in = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((3, 4), (4,), (2, 3))]
    for i, g in enumerate(clip_in):
        t[f"clip.in.{i}"] = g
    for case, max_norm in (("small", 1.0), ("big", 100.0)):
        ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in clip_in]
        for p, g in zip(ps, clip_in):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ps, max_norm)
        t[f"clip.{case}.norm"] = norm.reshape(1).to(torch.float64)
        for i, p in enumerate(ps):
            t[f"clip.{case}.out.{i}"] = p.grad.clone()

    t = {k: v.contiguous() for k, v in t.items()}
    save_file(t, str(OUT / "optim.safetensors"))
    (OUT / "optim.safetensors").chmod(0o644)

    lines = [
        "# Optimizer fixtures",
        "",
        "Generated by `tools/gen_optim_fixtures.py` (deterministic; rerun it to regenerate):",
        "",
        f"* torch {torch.__version__}, transformers {transformers.__version__}, Python {sys.version.split()[0]}",
        f"* `torch.optim.AdamW(lr={LR}, betas=({BETA1}, {BETA2}), eps={EPS}, foreach=False)` with two parameter",
        f"  groups: weight_decay {WD} for `encoder.layers.0.attention.q_proj.weight` [3, 4] and",
        "  `lm_head.weight` [2, 3], weight_decay 0 for `encoder.layers.0.layer_norm.weight` [4];",
        f"  {STEPS} updates with the stored gradients `grad.<k>.<name>` (float64 throughout).",
        f"* runs: `linear` = `get_linear_schedule_with_warmup(warmup={WARMUP}, total={STEPS})`, `cosine` =",
        f"  `get_cosine_schedule_with_warmup(warmup={WARMUP}, total={STEPS})`, `constant` = no scheduler;",
        "  `<run>.factors[k]` is the factor applied to update k (the `LambdaLR` lambda at k).",
        "* `schedule.<kind>.w<W>.t<T>`: factors at steps 0..=T of transformers' `get_<kind>_schedule_with_warmup`.",
        "* `clip.*`: `torch.nn.utils.clip_grad_norm_` (norm 2) on `clip.in.{0,1,2}` with max_norm 1.0",
        "  (`small`, clips) and 100.0 (`big`, no-op); `clip.<case>.norm` is the returned pre-clip norm.",
        "",
        "Read by `tests/optim.rs`.",
        "",
    ]
    (OUT / "README.md").write_text("\n".join(lines))
    print(f"wrote {OUT}/optim.safetensors ({len(t)} tensors) and README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
