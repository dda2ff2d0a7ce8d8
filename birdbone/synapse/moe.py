"""The synaptic mixture of experts: SwiGLU experts with a metabolism that splits and merges them.

:class:`ExpertLayer` routes each token to its top-k of E experts (stacked weights, a linear
router with a bias) — top-k over families, so that twins share their parent's place (see
:meth:`ExpertLayer.routing`). Every training step it observes each expert's share of the routing
mass (load) and mean routed input; every metabolism round (:meth:`ExpertLayer.assess`) it books:

* contribution — how much the probe loss rises when the expert's output is left out (leave-one-
  expert-out on a fixed probe batch; a first-order estimate −⟨∂L/∂y_e, y_e⟩ was tried and measured
  to average towards zero as training converges, starving useful experts too);
* energy — income minus a tax, smoothed over rounds: E_e ← (1 − λ)E_e + λ(income_e −
  ``break_even`` − ``energy_cost_rel``), income_e = E · c_e / Σ|c| capped at 2 (1 for the average
  expert): an expert earning under half the average loses energy, and below −``bankrupt_energy``
  (after a grace period of ``protect_intervals`` rounds, which twins get too) it is bankrupt;
* NeuroScore — the mean of three ranks among the experts (each in [0, 1]): efficiency
  (contribution per unit of energy spent; the tax is the same for every expert, so it ranks like
  the contribution), specialization (1 − cos(mean input routed to it, mean input of all tokens))
  and resilience (1 / variance of its contribution relative to its size, c²/Var(c)); health is its
  running mean, so the best expert's health tends to 1 and every threshold in [0, 1] is reachable.
  Measured: efficiency per routed token and resilience from the raw variance both fall with load,
  as specialization does, so the healthy experts were always the idle ones and a 1500-step run of
  30 rounds split nothing.

:func:`split` and :func:`merge` are the two events. A split gives twins the parent's weights with
antisymmetric noise, router rows pushed apart by ``router_contrastive_push`` · ‖row‖ in opposite
directions, and each the parent's router bias − ln 2, so together they carry the parent's routing
mass exactly; the output moves only by the noise, measured on a probe batch (a split beyond the
tolerance is undone). A merge folds a bankrupt
expert into its nearest neighbour (cosine of mean routed inputs), averaging their weights by load.
Both return the index map old → new, which :func:`remap_optimizer` uses to keep Adam's moments
with the weights they belong to.

"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Metabolism:
    energy_cost_rel: float = 0.015
    energy_tau: float = 50.0  # steps: the running load and mean routed input
    round_rate: float = 0.5  # weight of the newest metabolism round in energy and health
    bankrupt_energy: float = 0.4
    break_even: float = 0.5  # income (1 = the average expert's contribution) at which energy holds
    split_health_min: float = 0.80
    overload: float = 1.0  # load share above overload / E (more than a fair share) counts as overloaded
    router_contrastive_push: float = 0.1
    protect_intervals: int = 2  # rounds after its birth in which a twin cannot be merged (and every expert's first rounds)
    max_experts: int = 8
    min_experts: int = 2


class ExpertLayer(nn.Module):
    """E SwiGLU experts of width ``f`` behind a top-``k`` router; drop-in for the MLP."""

    def __init__(self, d: int, f: int, experts: int, top_k: int, metabolism: Metabolism = Metabolism()):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k {top_k} must be in [1, experts = {experts}]")
        self.d, self.f, self.top_k, self.meta = d, f, top_k, metabolism
        self.gate = nn.Parameter(torch.randn(experts, f, d) * 0.02)
        self.up = nn.Parameter(torch.randn(experts, f, d) * 0.02)
        self.down = nn.Parameter(torch.randn(experts, d, f) * 0.02)
        self.router = nn.Parameter(torch.randn(experts, d) * 0.02)
        self.router_bias = nn.Parameter(torch.zeros(experts))
        for name in ("energy", "health", "load", "contrib", "contrib_var", "protect"):
            self.register_buffer(name, torch.zeros(experts))
        self.protect.fill_(metabolism.protect_intervals)  # a grace period: no expert is judged on its first rounds
        self.register_buffer("mean_in", torch.zeros(experts, d))
        self.register_buffer("ids", torch.arange(experts))
        self.register_buffer("family", torch.arange(experts))  # twins share their parent's family
        self.register_buffer("next_id", torch.tensor(experts))
        self.left_out: int | None = None  # an expert whose output is dropped (leave-one-out probes)

    @property
    def experts(self) -> int:
        return self.gate.shape[0]

    def routing(self, flat: torch.Tensor) -> torch.Tensor:
        """Per token and expert, the weight of the expert's output (N, E). The top-k is taken over
        families — an expert and the twins it split into — whose logit is the log-sum-exp of their
        members'; inside a chosen family the members share its gate by softmax. A family of one is
        a plain top-k expert; twins at the parent's logit − ln 2 leave every choice and gate as it was."""
        logits = flat @ self.router.t() + self.router_bias  # (N, E)
        fams, member_of = torch.unique(self.family, return_inverse=True)
        fam_lse = torch.full((flat.shape[0], len(fams)), -float("inf"), dtype=logits.dtype, device=logits.device)
        fam_lse = fam_lse.scatter_reduce(1, member_of.expand_as(logits), logits, reduce="amax")
        fam_lse = fam_lse + torch.zeros_like(fam_lse).scatter_add(1, member_of.expand_as(logits), (logits - fam_lse[:, member_of]).exp()).log()
        k = min(self.top_k, len(fams))
        top, idx = fam_lse.topk(k, dim=-1)
        gates = torch.zeros_like(fam_lse).scatter(1, idx, torch.softmax(top, dim=-1))
        return gates[:, member_of] * (logits - fam_lse[:, member_of]).exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.d)
        weight = self.routing(flat)
        if self.training:
            self.observe(flat.detach(), weight.detach())
        out = torch.zeros_like(flat)
        for e in range(self.experts):
            rows = (weight[:, e] > 0).nonzero(as_tuple=True)[0]
            if rows.numel() == 0 or e == self.left_out:
                continue
            xe = flat[rows]
            y = F.linear(F.silu(F.linear(xe, self.gate[e])) * F.linear(xe, self.up[e]), self.down[e])
            out.index_add_(0, rows, weight[rows, e, None] * y)
        return out.reshape(shape)

    @torch.no_grad()
    def observe(self, flat: torch.Tensor, weight: torch.Tensor) -> None:
        """Every training step: each expert's share of the routing mass and its mean routed input."""
        lam = 1.0 / self.meta.energy_tau
        load = weight.sum(0) / max(flat.shape[0], 1)
        self.load.mul_(1 - lam).add_(lam * load)
        routed = load > 0
        mean = (weight.t() @ flat) / weight.sum(0).clamp(min=1e-12)[:, None]
        self.mean_in[routed] = (1 - lam) * self.mean_in[routed] + lam * mean[routed]

    @torch.no_grad()
    def assess(self, contribution: torch.Tensor) -> None:
        """One metabolism round: ``contribution`` is each expert's leave-one-out loss rise on a probe
        batch (positive: the model needs it). Income E·c_e/Σ|c| is 1 for an expert that pulls its
        weight; energy and health are running means over rounds (rate ``round_rate``)."""
        m, E = self.meta, self.experts
        c = contribution.to(self.energy.dtype)
        income = (E * c / c.abs().sum().clamp(min=1e-12)).clamp(max=2.0)
        lam = m.round_rate
        self.energy.mul_(1 - lam).add_(lam * (income - m.break_even - m.energy_cost_rel))
        delta = c - self.contrib
        self.contrib.add_(lam * delta)
        self.contrib_var.mul_(1 - lam).add_(lam * delta * delta)
        self.health.mul_(1 - lam).add_(lam * self.neuro_score())

    def neuro_score(self) -> torch.Tensor:
        """Mean of the ranks (0 worst … 1 best) of efficiency, specialization and resilience."""
        E = self.experts
        efficiency = self.contrib / self.meta.energy_cost_rel  # contribution per energy spent: the tax is flat
        global_in = (self.mean_in * self.load[:, None]).sum(0) / self.load.sum().clamp(min=1e-12)
        specialization = 1.0 - F.cosine_similarity(self.mean_in, global_in[None, :].expand_as(self.mean_in), dim=-1)
        resilience = self.contrib.square() / (self.contrib_var + 1e-12)  # scale-free: a big contribution may vary more

        def rank(v):
            return torch.argsort(torch.argsort(v)).float() / max(E - 1, 1)

        return (rank(efficiency) + rank(specialization) + rank(resilience)) / 3.0

    def wants(self) -> tuple[list[int], list[int]]:
        """(experts to split, experts to merge) by the metabolism's rules, at most one of each."""
        m, E = self.meta, self.experts
        split = [e for e in range(E) if self.health[e] >= m.split_health_min and self.load[e] > m.overload / E and E < m.max_experts]
        broke = [e for e in range(E) if self.energy[e] < -m.bankrupt_energy and self.protect[e] <= 0 and E > max(m.min_experts, self.top_k)]
        split.sort(key=lambda e: -float(self.load[e]))
        broke.sort(key=lambda e: float(self.energy[e]))
        return split[:1], broke[:1]


@torch.no_grad()
def contributions(layer: ExpertLayer, probe_loss) -> torch.Tensor:
    """Leave-one-expert-out: how much ``probe_loss()`` rises when each expert's output is dropped."""
    base = probe_loss()
    out = torch.zeros(layer.experts)
    try:
        for e in range(layer.experts):
            layer.left_out = e
            out[e] = probe_loss() - base
    finally:
        layer.left_out = None
    return out


def fit_shapes(layer: ExpertLayer, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Give the layer as many experts as a checkpoint's ``prefix``-ed tensors hold (before loading it)."""
    n = state[prefix + "gate"].shape[0]
    if n != layer.experts:
        _resize(layer, {name: torch.zeros((n, *getattr(layer, name).shape[1:]), dtype=getattr(layer, name).dtype)
                        for name in (*STACKED, *ACCOUNTS)})


def _resize(layer: ExpertLayer, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        old = getattr(layer, name)
        if isinstance(old, nn.Parameter):
            setattr(layer, name, nn.Parameter(t.contiguous(), requires_grad=old.requires_grad))
        else:
            setattr(layer, name, t.contiguous())


STACKED = ("gate", "up", "down", "router", "router_bias")
ACCOUNTS = ("energy", "health", "load", "contrib", "contrib_var", "protect", "mean_in", "ids", "family")


@torch.no_grad()
def split(layer: ExpertLayer, e: int, generator: torch.Generator | None = None, noise: float = 1e-3) -> list[int | None]:
    """Expert e becomes twins (e and a new last expert). Returns, per new expert, the old index it came from."""
    m = layer.meta
    E = layer.experts
    out: dict[str, torch.Tensor] = {}
    for name in STACKED:
        p = getattr(layer, name).data
        twin = p[e].clone()
        if name in ("gate", "up", "down"):
            eps = torch.randn(twin.shape, generator=generator) * noise * p[e].std()
            p = p.clone()
            p[e] = twin + eps
            twin = twin - eps
        elif name == "router":
            u = torch.randn(twin.shape, generator=generator)
            u = u / u.norm().clamp(min=1e-12) * m.router_contrastive_push * twin.norm()
            p = p.clone()
            p[e] = twin + u
            twin = twin - u
        else:  # the bias: each twin at the parent's logit − ln 2
            p = p.clone()
            p[e] = p[e] - math.log(2.0)
            twin = p[e].clone()
        out[name] = torch.cat([p, twin[None]], dim=0)
    for name in ACCOUNTS:
        b = getattr(layer, name)
        twin = b[e].clone()
        if name in ("energy",):
            twin = b[e] * 0.5
            b = b.clone()
            b[e] = twin
        if name == "load":
            b = b.clone()
            b[e] = b[e] / 2
            twin = b[e].clone()
        out[name] = torch.cat([b, twin[None]], dim=0)
    out["ids"][-1] = layer.next_id
    out["protect"][e] = out["protect"][-1] = m.protect_intervals
    layer.next_id += 1
    _resize(layer, out)
    return list(range(E)) + [e]


@torch.no_grad()
def nearest(layer: ExpertLayer, e: int) -> int:
    sims = F.cosine_similarity(layer.mean_in, layer.mean_in[e][None, :], dim=-1)
    sims[e] = -float("inf")
    return int(sims.argmax())


@torch.no_grad()
def merge(layer: ExpertLayer, e: int) -> tuple[int, list[int | None]]:
    """Fold expert e into its nearest neighbour (weights averaged by load); returns (neighbour, index map)."""
    n = nearest(layer, e)
    w_e, w_n = float(layer.load[e]), float(layer.load[n])
    a = w_n / max(w_e + w_n, 1e-12) if w_e + w_n > 0 else 0.5
    keep = [i for i in range(layer.experts) if i != e]
    out = {}
    for name in STACKED:
        p = getattr(layer, name).data.clone()
        if name != "router_bias":
            p[n] = a * p[n] + (1 - a) * p[e]
        else:  # both routing masses go to the survivor
            p[n] = torch.logaddexp(p[n], p[e])
        out[name] = p[keep]
    for name in ACCOUNTS:
        b = getattr(layer, name).clone()
        if name == "load":
            b[n] = b[n] + b[e]
        out[name] = b[keep]
    _resize(layer, out)
    return (n if n < e else n - 1), keep


def remap_optimizer(opt: torch.optim.Optimizer, old: dict[str, nn.Parameter], layer: ExpertLayer, index: list[int | None]) -> None:
    """Point the optimizer at the layer's new stacked parameters, carrying each expert's Adam
    moments along the index map (new expert i takes old expert index[i]'s moments; None: zeros)."""
    for name, old_p in old.items():
        new_p = getattr(layer, name)
        state = opt.state.pop(old_p, None)
        for group in opt.param_groups:
            group["params"] = [new_p if p is old_p else p for p in group["params"]]
        if state is None:
            continue
        new_state = {}
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == old_p.shape[0]:
                rows = [v[i] if i is not None else torch.zeros_like(v[0]) for i in index]
                new_state[k] = torch.stack(rows)
            else:
                new_state[k] = v
        opt.state[new_p] = new_state


@torch.no_grad()
def probe_output(layer: ExpertLayer, probe: torch.Tensor) -> torch.Tensor:
    was = layer.training
    layer.eval()
    try:
        return layer(probe)
    finally:
        layer.train(was)


def surgery(layer: ExpertLayer, opt: torch.optim.Optimizer | None, step: int, probe: torch.Tensor | None = None,
            tolerance: float = 0.05, generator: torch.Generator | None = None) -> list[dict]:
    """One split/merge round on ``layer``: the lineage events it caused. A split whose twins move the
    layer's output on ``probe`` by more than ``tolerance`` (relative L2) is undone and logged as rejected:
    top-k routing can let the twins push a third expert out, which the ln 2 bias cannot repair."""
    events = []
    born: set[int] = set()  # twins born this round keep their full protection past its end
    to_split, to_merge = layer.wants()
    for e in to_split:
        old = {name: getattr(layer, name) for name in STACKED}
        saved = {name: getattr(layer, name) for name in (*STACKED, *ACCOUNTS, "next_id")}
        parent = int(layer.ids[e])
        health, load = float(layer.health[e]), float(layer.load[e])
        before = probe_output(layer, probe) if probe is not None else None
        index = split(layer, e, generator)
        deviation = None
        if before is not None:
            deviation = float((probe_output(layer, probe) - before).norm() / before.norm().clamp(min=1e-12))
            if deviation > tolerance:
                _resize(layer, {k: v.data if isinstance(v, nn.Parameter) else v for k, v in saved.items()})
                for name in STACKED:  # the very same Parameter objects the optimizer holds
                    setattr(layer, name, saved[name])
                events.append({"step": step, "event": "split rejected", "parent": parent, "deviation": deviation, "tolerance": tolerance})
                continue
        if opt is not None:
            remap_optimizer(opt, old, layer, index)
        born.update((int(layer.ids[e]), int(layer.ids[-1])))
        events.append({"step": step, "event": "split", "parent": parent, "children": [int(layer.ids[e]), int(layer.ids[-1])],
                       "health": health, "load": load, "experts": layer.experts, "deviation": deviation})
    to_split, to_merge = layer.wants()
    for e in to_merge:
        old = {name: getattr(layer, name) for name in STACKED}
        dead, energy = int(layer.ids[e]), float(layer.energy[e])
        n, keep = merge(layer, e)
        if opt is not None:
            remap_optimizer(opt, old, layer, keep)
        events.append({"step": step, "event": "merge", "dead": dead, "into": int(layer.ids[n]), "energy": energy, "experts": layer.experts})
    older = torch.tensor([int(i) not in born for i in layer.ids], dtype=layer.protect.dtype)
    layer.protect.sub_(older).clamp_(min=0)
    return events
