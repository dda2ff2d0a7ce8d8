"""The synapse room's configs: :class:`SynapticConfig` (the model: every biological parameter,
with one switch per mechanism) and :class:`TrainConfig` (a training run). Importing them loads
no torch; a field's comment is its documentation (``--help`` reads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STOCHASTIC_MODES = ("normal_reparam", "gumbel_sigmoid_ste", "straight_through")


# a CPU-sized model; a config past this is a typo or a forged file, and would take the machine's memory
MAX_PARAMS = 2e9


@dataclass(frozen=True)
class SynapticConfig:
    """Every parameter of the model, with its biological reading where it has one.

    Architecture: a llama with ``n_layer`` blocks of width ``n_embd``, ``n_head`` heads, SwiGLU
    hidden width ``intermediate``, context ``block_size``, rotary base ``rope_theta``.

    Presynaptic (``presynaptic=True``), per layer, head and key position j, advanced query by
    query t:

    * calcium C_t = ``alpha_ca`` · (1 − 1/``tau_buf``) · softplus(L_t) + (1 − 1/``tau_c``) · C_{t−1},
      L_t the query's attention logit on the key. ``tau_buf`` is calcium buffering: buffers bind
      a share 1/tau_buf of each influx before it reaches the sensor (tau_buf → ∞: no buffer).
    * synaptotagmin sensor Syt(C) = C / (C + ``syt_fast_kd``).
    * P_primed = 1 − exp(−(t − j + 1)/``tau_prime``): the key's vesicles dock when the token
      arrives and become primed over ``tau_prime`` tokens.
    * complexin: a learned clamp per head (initialised at 0) that holds back release.
    * a learned gain per head on the bias (initialised at 1; ``synapse enable`` starts it at 0,
      so a plain checkpoint turned synaptic computes what it computed before).
    * release P = σ(3·Syt + 2·P_primed − 2·complexin) · σ(L); W_eff = min(P, RRP); the pool
      refills as RRP ← RRP − W_eff + (1 − RRP)/``tau_rrp``; the logit gains
      max(log W_eff, −``depletion_bound``).
    * stochastic release (training only, ``stochastic=True``): on a share
      ``stochastic_train_frac`` of query positions the release is a draw — ``stochastic_count_cap``
      release sites per synapse (the count cap), W = k/n with k ~ Binomial(n, W_eff) — as a normal
      reparameterisation, a Gumbel-sigmoid per site with temperature ``stochastic_tau`` and a
      straight-through estimator, or a hard draw with a straight-through gradient.

    Postsynaptic (``hebbian=True``), in each MLP's output projection W (d_ff → d): y = h·W + g·h·A.
    A = Pᵀ M Q with trained projections P (rank × d_ff) and Q (rank × d) and a per-sequence fast
    state M (rank × rank), so A never exceeds ``rank_eligibility`` by construction. Eligibility
    E ← ``rho_elig`` · E + (P h)(Q y)ᵀ; M ← M + η · G · E, then scaled down to Frobenius norm
    ≤ ``fast_rel_max`` · ‖W‖ (P and Q have orthonormal rows at the start, so ‖A‖ ≈ ‖M‖: the fast
    weights may grow as large as the slow ones, no larger); token t is computed with the M of tokens before it; P h and Q y enter the
    trace as unit vectors (the directions of pre and post activity). The gate
    G = σ(``camkii_gain`` · c − ``pp1_gain``) reads a CaMKII latch c ∈ [0, 1] that follows
    c ← c + (Hill(a + c) − c)/``latch_tau``, Hill(x) = x⁴/(½⁴ + x⁴), with activity
    a = tanh(RMS(h_t) / causal running mean of RMS(h)): it self-excites once high (hysteresis),
    stays shut under weak drive and opens under sustained activity. η is
    ``hebb_eta``, times (1 + ``bdnf_gamma`` · a) when BDNF is on (``bdnf_gamma`` > 0). g is a
    trained scalar per layer (initialised at 1; 0 after ``synapse enable``).

    Structural (``moe=True``, :mod:`birdbone.synapse.moe`): the MLP becomes ``experts`` SwiGLU
    experts of width intermediate / experts (the dense MLP's parameters, shared out), ``top_k``
    routed per token (over families: twins keep their parent's place). Every ``splitmerge_every``
    training steps a metabolism round books each expert's leave-one-out contribution on a probe
    batch as income against the tax ``energy_cost_rel``, updates health (a running mean of the
    NeuroScore rank), splits a healthy (≥ ``split_health_min``) overloaded expert into twins
    (router rows pushed apart by ``router_contrastive_push``), merges a bankrupt one into its
    nearest neighbour, up to ``max_experts``. With ``hebbian`` the fast weights sit on the layer's
    output (A: d × d).
    """

    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    intermediate: int = 352
    block_size: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # switches
    presynaptic: bool = False
    stochastic: bool = False
    hebbian: bool = False
    moe: bool = False
    # presynaptic
    tau_c: float = 4.0
    tau_rrp: float = 40.0
    alpha_ca: float = 0.25
    syt_fast_kd: float = 0.4
    tau_buf: float = 4.0
    tau_prime: float = 5.0
    depletion_bound: float = 5.0
    stochastic_train_frac: float = 0.12
    stochastic_mode: str = "normal_reparam"
    stochastic_tau: float = 1.0
    stochastic_count_cap: int = 8
    # postsynaptic
    rank_eligibility: int = 16
    rho_elig: float = 0.95
    camkii_gain: float = 1.5
    pp1_gain: float = 1.0
    bdnf_gamma: float = 0.0
    hebb_eta: float = 0.1
    latch_tau: float = 4.0
    fast_rel_max: float = 1.0
    # structural
    energy_cost_rel: float = 0.015
    split_health_min: float = 0.80
    router_contrastive_push: float = 0.1
    experts: int = 4
    top_k: int = 2
    splitmerge_every: int = 100
    max_experts: int = 8

    def __post_init__(self):
        for name in ("tau_c", "tau_rrp", "tau_buf", "tau_prime", "latch_tau", "stochastic_tau", "syt_fast_kd", "alpha_ca", "rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} must split into {self.n_head} heads of even width")
        if min(self.vocab_size, self.n_layer, self.n_head, self.intermediate, self.block_size, self.rank_eligibility, self.stochastic_count_cap) < 1:
            raise ValueError("sizes, rank_eligibility and stochastic_count_cap must be ≥ 1")
        if self.stochastic_mode not in STOCHASTIC_MODES:
            raise ValueError(f"stochastic_mode {self.stochastic_mode!r}: choose one of {', '.join(STOCHASTIC_MODES)}")
        if not 0.0 <= self.stochastic_train_frac <= 1.0 or not 0.0 <= self.rho_elig < 1.0:
            raise ValueError("stochastic_train_frac must be in [0, 1] and rho_elig in [0, 1)")
        if self.top_k < 1 or self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} must be in [1, experts = {self.experts}]")
        if self.depletion_bound <= 0 or self.fast_rel_max <= 0 or self.bdnf_gamma < 0 or self.hebb_eta < 0:
            raise ValueError("depletion_bound and fast_rel_max must be > 0, bdnf_gamma and hebb_eta ≥ 0")
        if self.moe and not self.top_k <= self.experts <= self.max_experts:
            raise ValueError(f"experts {self.experts} must be in [top_k = {self.top_k}, max_experts = {self.max_experts}]")
        if self.splitmerge_every < 1 or not 0.0 <= self.split_health_min <= 1.0 or self.energy_cost_rel < 0:
            raise ValueError("splitmerge_every ≥ 1, split_health_min in [0, 1], energy_cost_rel ≥ 0")
        experts = self.max_experts if self.moe else 1
        params = self.n_layer * (4 * self.n_embd**2 + 3 * self.n_embd * self.intermediate * experts) + self.vocab_size * self.n_embd
        if params > MAX_PARAMS or self.block_size > 2**20:
            raise ValueError(f"about {params:.3g} parameters (n_layer, n_embd, intermediate, experts) or block_size {self.block_size}: "
                             f"the living transformer is a small model, at most {MAX_PARAMS:.0e} parameters and 2^20 positions")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# -- plain parts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    model: SynapticConfig = field(default_factory=SynapticConfig)
    vocab: int = 4096  # tokenizer size (byte-level BPE); the model's vocab_size follows it
    steps: int = 1000
    batch: int = 8
    seq: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    recall_share: float = 0.125  # share of each batch's windows that are synthetic recall tasks
    recall_packing: int = 0  # 0: one episode ends each recall window; n > 0: windows packed with episodes, each list asked n times
    holdout: float = 0.1  # the text's last tenth: never trained on
    eval_every: int = 100
    eval_windows: int = 8
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if not 256 <= self.vocab <= 65536:
            raise ValueError(f"vocab {self.vocab}: expected 256..65536 (4-8 k suits these models)")
        if self.steps < 1 or self.batch < 1 or self.seq < 16 or self.seq > self.model.block_size:
            raise ValueError(f"steps ≥ 1, batch ≥ 1 and 16 ≤ seq ≤ block_size ({self.model.block_size})")
        if not 0 < self.min_lr <= self.lr or self.warmup < 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ValueError("0 < min_lr ≤ lr, warmup ≥ 0, grad_clip > 0, weight_decay ≥ 0")
        if not 0.0 <= self.recall_share <= 1.0 or not 0.0 < self.holdout < 0.5 or not 0 <= self.recall_packing <= 8:
            raise ValueError("recall_share in [0, 1], holdout in (0, 0.5), recall_packing in 0..8")
        if self.eval_every < 1 or self.checkpoint_every < 1 or self.eval_windows < 1:
            raise ValueError("eval_every, checkpoint_every and eval_windows must be ≥ 1")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine down to min_lr."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        f = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, f)))
