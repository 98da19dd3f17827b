"""Self-distillation of exit heads: the frozen original model is the teacher, unlabeled calibration
data the only input. The backbone's states are computed once, so training touches the heads alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DistillResult:
    steps: int
    first_loss: list[float]   # per exit, on the whole set before training
    final_loss: list[float]   # per exit, after

    def to_dict(self) -> dict:
        return {"steps": self.steps, "first_loss": [round(x, 5) for x in self.first_loss],
                "final_loss": [round(x, 5) for x in self.final_loss]}


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over classes, batch mean: the student learns the teacher's whole belief."""
    return F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                    reduction="batchmean")


def cosine_to_teacher(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def distill_heads(heads: nn.ModuleList, features: list[torch.Tensor], target: torch.Tensor,
                  student: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                  steps: int = 300, batch: int = 64, lr: float = 3e-3, seed: int = 0,
                  progress: bool | None = None, desc: str = "distilling exit heads") -> DistillResult:
    """Train heads[e] so that student(heads[e], features[e]) matches `target` (teacher outputs, one
    row per sample). features[e]: [n, H] states at exit e. Deterministic for a given seed.
    `progress`: a bar, one summary line or nothing (adaptc.progress)."""
    from ..progress import Steps

    n = target.shape[0]
    gen = torch.Generator().manual_seed(seed)
    params = [p for h in heads for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)

    def losses(rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])
        return [loss_fn(student(h, pick(f)), pick(target)) for h, f in zip(heads, features)]

    with torch.no_grad():
        first = [float(x) for x in losses()]
    start = [{k: v.clone() for k, v in h.state_dict().items()} for h in heads]
    heads.train()
    with Steps(desc, steps, progress) as bar:
        for _ in range(steps):
            rows = torch.randint(0, n, (min(batch, n),), generator=gen)
            loss = torch.stack(losses(rows)).sum()  # exits are independent: one sum trains them all
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.advance(note=f"loss {loss.item():.4f}")
        bar.done = f"distilled {len(heads)} exit heads ({steps} steps)"
    heads.eval()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        final = [float(x) for x in losses()]
        for e, (before, after) in enumerate(zip(first, final)):
            if after > before:  # training from a closed-form start can overshoot: keep the better head
                heads[e].load_state_dict(start[e])
                final[e] = before
    return DistillResult(steps, first, final)


@torch.no_grad()
def least_squares_init(adapters: list[nn.Linear], features: list[torch.Tensor], target: torch.Tensor,
                       ridge: float = 1e-3) -> None:
    """Start residual affine heads (x + A x + b) at the ridge-regression fit of the teacher's final state:
    a closed-form start that distillation then refines through the model's own output layers."""
    for adapter, x in zip(adapters, features):
        x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1).double()
        gram = x1.T @ x1
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        sol = torch.linalg.solve(gram, x1.T @ (target - x).double())  # [H+1, H]
        adapter.weight.copy_(sol[:-1].T.to(adapter.weight.dtype))
        adapter.bias.copy_(sol[-1].to(adapter.bias.dtype))


L2_GRID = (0.1, 1.0, 10.0, 100.0)  # penalty on standardised weights, relative to the row count


def fit_agreement_predictor(linear: nn.Linear, features: torch.Tensor, agree: torch.Tensor, *, seed: int = 0) -> None:
    """Logistic regression of `agree` (0/1 per row) on `features` ([n, F]) into `linear` (F -> 1): CALM's
    early-exit classifier. The L2 strength is chosen on a fifth of the rows held out, then the fit is
    redone on all of them; features are standardised for the fit and the scaling folded back in."""
    x, y = features.detach().float(), agree.detach().float()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    if float(y.min()) == float(y.max()):  # one class only: a constant predictor
        w, b = torch.zeros(x.shape[1]), torch.logit(y.mean().clamp(0.01, 0.99)).reshape(1)
    else:
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        held, train = perm[: len(y) // 5], perm[len(y) // 5:]

        def held_loss(l2: float) -> float:
            w, b = _logistic(z[train], y[train], l2)
            return float(F.binary_cross_entropy_with_logits(z[held] @ w + b, y[held]))

        l2 = min(L2_GRID, key=held_loss) if len(held) >= 10 else L2_GRID[-1]
        w, b = _logistic(z, y, l2)
    with torch.no_grad():
        scaled = w / sd
        linear.weight.copy_(scaled[None].to(linear.weight.dtype))
        linear.bias.copy_((b - (scaled * mu).sum()).to(linear.bias.dtype))


def _logistic(z: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum() / len(y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def distill_outputs(student: nn.Module, teacher: nn.Module, batches: list[dict], kind: str,
                    params: list[torch.Tensor], *, steps: int = 100, lr: float = 1e-3, seed: int = 0,
                    progress: bool | None = None, desc: str = "distilling") -> DistillResult:
    """Train only `params` (e.g. relaxed recursion's low-rank deltas) so that `student`'s outputs match the
    frozen `teacher`'s on unlabeled batches: KL over classes (classifier) or next tokens at real tokens
    (causal_lm), cosine of the mean-pooled state (embedding). Gradients reach `params` alone
    (torch.autograd.grad): the rest of the model is never trained and no .grad is left on it."""
    from ..progress import Steps

    def loss_of(batch: dict) -> torch.Tensor:
        valid = batch["attention_mask"].bool() if "attention_mask" in batch else \
            torch.ones(batch["input_ids"].shape, dtype=torch.bool, device=batch["input_ids"].device)
        with torch.no_grad():
            want = teacher(**batch)
        got = student(**batch)
        if kind == "classifier":
            return kl_to_teacher(got.logits.float(), want.logits.float())
        if kind == "embedding":
            w = valid.unsqueeze(-1).to(got.last_hidden_state.dtype)
            mean = lambda h: (h * w).sum(1) / w.sum(1).clamp(min=1.0)  # noqa: E731
            return cosine_to_teacher(mean(got.last_hidden_state).float(), mean(want.last_hidden_state).float())
        return kl_to_teacher(got.logits[valid].float(), want.logits[valid].float())

    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    start = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            first = float(sum(loss_of(b) for b in batches) / len(batches))
        with torch.enable_grad(), Steps(desc, steps, progress) as bar:
            for _ in range(steps):
                loss = loss_of(batches[int(torch.randint(0, len(batches), (1,), generator=gen))])
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                bar.advance(note=f"loss {loss.item():.4f}")
            bar.done = f"distilled {len(params)} tensors ({steps} steps)"
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    with torch.no_grad():
        final = float(sum(loss_of(b) for b in batches) / len(batches))
        if final > first:  # the SVD start was better: keep it
            for p, s in zip(params, start):
                p.copy_(s)
            final = first
    return DistillResult(steps, [first], [final])
