"""Relaxed recursion (Bae et al., "Relaxed Recursive Transformers", 2024): N distinct blocks become K
shared blocks looped N/K times, each loop position keeping a low-rank delta of its own.

    groups = share_groups(30, 10, "cycle")        # the tie map: positions 0, 10, 20 share block 0, ...
    basis = relaxation_basis(layers, groups, linear_names(layers), "averaged")
    modules = relaxed_modules(layers, groups, basis, rank=64)   # {"3.self_attn.q_proj": RelaxedLinear, ...}

Every Linear of position l computes x W_g^T + (x A_l^T) B_l^T + b_l, where W_g is its block's shared weight
(one Parameter object, the same at every position of the block: it is stored and counted once) and
B_l A_l the rank-r truncated SVD of W_l - W_g (A = V_r^T, B = U_r diag(S_r)) — or, given the covariance
C = L L^T of the inputs the Linear sees, the SVD of (W_l - W_g) L with A = V_r^T L^-1, the best rank-r fit of
the Linear's outputs on those inputs (ASVD / SVD-LLM's whitening). At full rank the delta is
W_l - W_g itself, so the model is the original up to rounding. Norms and biases stay per position,
exact: they are a rounding error of the parameter count.

The model's own layer loop runs the N positions, so each loop step keeps its own layer index, attention
mask and KV-cache slot, and generate() is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SHARINGS = ("cycle", "middle_cycle")
INITS = ("averaged", "stepwise", "weighted")


class RelaxedLinear(nn.Module):
    """One position's Linear: its block's shared weight, its own bias, and its low-rank delta B A."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, delta_a: torch.Tensor | None,
                 delta_b: torch.Tensor | None):
        super().__init__()
        self.weight = weight  # the very Parameter every position of the block holds
        self.bias = bias
        have = delta_a is not None and delta_a.shape[0] > 0
        self.delta_a = nn.Parameter(delta_a, requires_grad=False) if have else None  # [r, in]
        self.delta_b = nn.Parameter(delta_b, requires_grad=False) if have else None  # [out, r]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def rank(self) -> int:
        return 0 if self.delta_a is None else self.delta_a.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.delta_a is not None:
            y = y + F.linear(F.linear(x, self.delta_a), self.delta_b)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def share_groups(num_layers: int, shared_blocks: int, sharing: str = "cycle") -> list[list[int]]:
    """The tie map: for each shared block, the loop positions that use it. cycle: position l uses block
    l mod K. middle_cycle: the first and last positions keep blocks of their own, the middle N - 2
    positions cycle through the other K - 2."""
    if sharing not in SHARINGS:
        raise ValueError(f"sharing must be one of {SHARINGS}, got {sharing!r}")
    K, N = int(shared_blocks), int(num_layers)
    if sharing == "cycle":
        if not 1 <= K <= N:
            raise ValueError(f"cycle sharing needs 1 <= shared blocks <= {N} layers, got {K}")
        return [list(range(k, N, K)) for k in range(K)]
    if not 3 <= K <= N or N < 3:
        raise ValueError(f"middle_cycle sharing needs 3 <= shared blocks <= {N} layers, got {K}")
    middle = [[1 + p for p in range(k, N - 2, K - 2)] for k in range(K - 2)]
    return [[0], *middle, [N - 1]]


def linear_names(layers: nn.ModuleList) -> list[str] | str:
    """The Linear submodules every block has under the same name and shape (what gets shared), or why
    the blocks cannot share weights."""
    def linears(block: nn.Module) -> dict[str, tuple[int, int, bool]]:
        return {n: (m.out_features, m.in_features, m.bias is not None)
                for n, m in block.named_modules() if isinstance(m, (nn.Linear, RelaxedLinear))}

    first = linears(layers[0])
    if not first:
        return f"block 0 ({type(layers[0]).__name__}) has no nn.Linear to share"
    for i, block in enumerate(layers):
        if type(block) is not type(layers[0]):
            return f"block {i} is a {type(block).__name__}, block 0 a {type(layers[0]).__name__}"
        if linears(block) != first:
            return f"block {i}'s Linear layers differ from block 0's in names or shapes"
    return list(first)


@dataclass
class RelaxationBasis:
    """What every rank of one sharing reads: the shared weights (per block and Linear name) and the
    truncated SVD of every position's delta, biggest singular values first."""

    groups: list[list[int]]
    names: list[str]
    shared: dict[tuple[int, str], torch.Tensor]                       # (block, name) -> W_g
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (position, name) -> (U S [out, m], V^T [m, in])

    def block_of(self, position: int) -> int:
        return next(g for g, members in enumerate(self.groups) if position in members)


@torch.no_grad()
def input_covariances(model: nn.Module, layers: nn.ModuleList, names: list[str],
                      batches: list[dict]) -> dict[tuple[int, str], torch.Tensor]:
    """(position, name) -> X^T X of that Linear's inputs at real tokens while `model` runs `batches`
    (float64): what a whitened delta keeps best."""
    cov: dict[tuple[int, str], torch.Tensor] = {}
    valid: list[torch.Tensor] = []
    last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # q/k/v (gate/up) read one tensor: one product

    def hook(key):
        def record(module, args):
            x = args[0]
            if key[0] in last and last[key[0]][0] is x:
                product = last[key[0]][1]
            else:
                rows = x[valid[0]] if x.dim() == 3 and x.shape[:2] == valid[0].shape else x.reshape(-1, x.shape[-1])
                rows = rows.float()
                product = (rows.T @ rows).to(torch.float64)
                last[key[0]] = (x, product)
            cov[key] = cov[key] + product if key in cov else product
        return record

    handles = [layers[l].get_submodule(n).register_forward_pre_hook(hook((l, n))) for l in range(len(layers)) for n in names]
    try:
        for b in batches:
            mask = b.get("attention_mask")
            valid[:] = [mask.bool() if mask is not None else torch.ones(b["input_ids"].shape, dtype=torch.bool)]
            model(**b)
            last.clear()
    finally:
        for h in handles:
            h.remove()
    return cov


def _damped(cov: torch.Tensor) -> torch.Tensor:
    """C + a tiny ridge: inputs that never vary keep C invertible."""
    damp = 1e-6 * float(cov.diagonal().mean().clamp(min=1e-12))
    return cov + damp * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)


def _low_rank(diff: torch.Tensor, m: int | None, cov: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, k], A [k, in]) with B A the best rank-k fit of `diff` (float64), k = min(m, full): in the
    Frobenius norm, or with `cov` = X^T X in the norm of the outputs ||X (diff - B A)^T|| (SVD of diff L,
    C = L L^T; A = V^T L^-1). Either way B A = diff at full rank."""
    if cov is None:
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        k = s.numel() if m is None else min(m, s.numel())
        return u[:, :k] * s[:k], vh[:k]
    chol = torch.linalg.cholesky(_damped(cov))
    u, s, vh = torch.linalg.svd(diff @ chol, full_matrices=False)
    k = s.numel() if m is None else min(m, s.numel())
    return u[:, :k] * s[:k], torch.linalg.solve_triangular(chol, vh[:k], upper=False, left=False)


@torch.no_grad()
def relaxation_basis(layers: nn.ModuleList, groups: list[list[int]], names: list[str], init: str = "averaged",
                     max_rank: int | None = None,
                     covariances: dict[tuple[int, str], torch.Tensor] | None = None) -> RelaxationBasis:
    """Shared weights by `init` (averaged: the mean of the block's positions; stepwise: its first
    position's; weighted: sum_l W_l C_l (sum_l C_l)^-1, the weight with the least output error summed over
    the positions' inputs) and the truncated SVD of each W_l - W_g, kept to `max_rank` (None: full); whitened by
    the inputs' `covariances` (input_covariances) where given. float64 on the weights' device, factors
    in the weights' dtype."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    shared, factors = {}, {}
    for g, members in enumerate(groups):
        for name in names:
            weights = [layers[l].get_submodule(name).weight for l in members]
            dtype = weights[0].dtype
            w64 = [w.detach().to(torch.float64) for w in weights]
            if init == "weighted":  # the least output error summed over the positions, on their inputs
                if covariances is None:
                    raise ValueError("init='weighted' weighs the positions by their inputs: it needs covariances")
                covs = [_damped(covariances[l, name].to(w64[0].device)) for l in members]
                base = torch.linalg.solve(sum(covs), sum(w @ c for w, c in zip(w64, covs)).T).T
            else:
                base = w64[0] if init == "stepwise" else torch.stack(w64).mean(0)
            shared[g, name] = base.to(dtype)
            for l, w in zip(members, w64):
                diff = w - shared[g, name].to(torch.float64)  # against the weight as stored, so full rank is exact
                if not bool(diff.any()):
                    factors[l, name] = (diff[:, :0].to(dtype), diff[:0].to(dtype))
                    continue
                cov = None if covariances is None else covariances[l, name].to(diff.device)
                b, a = _low_rank(diff, None if max_rank is None else int(max_rank), cov)
                factors[l, name] = (b.to(dtype).contiguous(), a.to(dtype).contiguous())
    return RelaxationBasis(groups, list(names), shared, factors)


def relaxed_modules(layers: nn.ModuleList, basis: RelaxationBasis, rank: int | None) -> dict[str, RelaxedLinear]:
    """{"<position>.<name>": RelaxedLinear} at `rank` (None: every delta at full rank; each capped by its
    matrix and by the basis). One Parameter per (block, name), shared by the block's positions. One rank
    for every Linear: spending a budget by the whitened singular values instead (greedy, per parameter)
    did worse on MiniLM-L6 (embedding cosine 0.69 vs 0.78 at K=3, rank 96's parameters)."""
    tied = {key: nn.Parameter(w.clone(), requires_grad=False) for key, w in basis.shared.items()}
    out = {}
    for g, members in enumerate(basis.groups):
        for l in members:
            for name in basis.names:
                us, vt = basis.factors[l, name]
                r = us.shape[1] if rank is None else min(int(rank), us.shape[1])
                bias = layers[l].get_submodule(name).bias
                out[f"{l}.{name}"] = RelaxedLinear(tied[g, name], bias, vt[:r].clone(), us[:, :r].clone())
    return out


def empty_relaxed_modules(layers: nn.ModuleList, groups: list[list[int]], names: list[str],
                          ranks: list[list[int]]) -> dict[str, RelaxedLinear]:
    """The modules of a saved plan with zero weights of the right shapes and ties (adaptc.load fills
    them with load_state_dict): ranks[l][i] is position l's rank for names[i]."""
    out = {}
    for members in groups:
        tied = {}
        for name in names:
            ref = layers[members[0]].get_submodule(name).weight
            tied[name] = nn.Parameter(torch.zeros_like(ref), requires_grad=False)
        for l in members:
            for i, name in enumerate(names):
                old = layers[l].get_submodule(name)
                ref, r = old.weight, ranks[l][i]
                if not 0 <= r <= min(ref.shape):
                    raise ValueError(f"rank {r} at position {l} {name} does not fit its {tuple(ref.shape)} weight")
                a = ref.new_zeros(r, ref.shape[1])
                b = ref.new_zeros(ref.shape[0], r)
                out[f"{l}.{name}"] = RelaxedLinear(tied[name], old.bias, a, b)
    return out


def install(layers: nn.ModuleList, modules: dict[str, RelaxedLinear], set_child=None) -> None:
    """Put `modules` in place inside `layers` (`set_child(parent, name, module)` to make it undoable)."""
    for path, module in modules.items():
        parent_path, _, name = path.rpartition(".")
        parent = layers.get_submodule(parent_path)
        (set_child or setattr)(parent, name, module)


def relax(layers: nn.ModuleList, shared_blocks: int, rank: int | None = None, *, sharing: str = "cycle",
          init: str = "averaged", covariances: dict | None = None) -> dict[str, RelaxedLinear]:
    """Relax `layers` in place to `shared_blocks` shared blocks with deltas of `rank` (None: full rank,
    the original function), whitened by `covariances` (input_covariances) if given; returns what was installed."""
    names = linear_names(layers)
    if isinstance(names, str):
        raise ValueError(names)
    basis = relaxation_basis(layers, share_groups(len(layers), shared_blocks, sharing), names, init,
                             max_rank=rank, covariances=covariances)
    modules = relaxed_modules(layers, basis, rank)
    install(layers, modules)
    return modules


def unique_parameters(module: nn.Module) -> tuple[int, int]:
    """(numel, bytes) of `module`'s parameters, each Parameter object counted once (shared weights once)."""
    seen = {id(p): p for p in module.parameters()}  # parameters() already drops repeats; ids make it explicit
    return sum(p.numel() for p in seen.values()), sum(p.numel() * p.element_size() for p in seen.values())


def relaxed_of(layers: nn.ModuleList) -> dict[str, RelaxedLinear]:
    """The RelaxedLinear modules inside `layers` by path (empty: not relaxed)."""
    return {n: m for n, m in layers.named_modules() if isinstance(m, RelaxedLinear)}


def tie_map(layers: nn.ModuleList) -> list[list[int]]:
    """Which positions share weights, read back from the modules (one Parameter object per block)."""
    by_weight: dict[int, list[int]] = {}
    for path, m in relaxed_of(layers).items():
        position = int(path.split(".")[0])
        members = by_weight.setdefault(id(m.weight), [])
        if position not in members:
            members.append(position)
    groups = sorted({tuple(sorted(v)) for v in by_weight.values()})
    return [list(g) for g in groups]
