"""The living transformer: a small llama-style GPT whose synapses tire and remember while it runs.

One readable file; its config, :class:`~birdbone.synapse.config.SynapticConfig`, is in ``config.py`` (so the
CLI can read it without loading torch). With every switch off, :class:`SynapticGPT` is a plain llama
(RMSNorm, rotary attention, SwiGLU MLP): copied into ``transformers``' ``LlamaForCausalLM`` it
gives the same logits (tested). Each switch adds one mechanism, all of them causal — position t
never sees a token after t, in training as in generation — and none of them ever changes a
trained weight during a forward pass:

* ``presynaptic``: Tsodyks–Markram depletion per (layer, head, key). Every query drives the
  calcium of each key it attends to; the key's release probability rises with calcium, its
  readily releasable pool (RRP) is spent by release and refills slowly, and the release the
  query gets, W_eff = min(P, RRP), enters its logits as a bounded log W_eff. A key attended again
  and again is depleted, so attention moves on. Training runs the same scan as generation.
* ``hebbian``: fast weights in the MLP's output projection, a per-sequence state that grows
  from pre/post co-activity through eligibility traces, gated by a bistable CaMKII/PP1 latch.
* ``moe``: the energy-driven mixture of experts that splits and merges
  (:mod:`birdbone.synapse.moe`; the metabolism runs in training, see ``synapse/train.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from birdbone.synapse.config import STOCHASTIC_MODES, SynapticConfig  # noqa: F401  (the config: every switch and parameter)

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary(head_dim: int, T: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim) in llama's half-split layout."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


# -- presynaptic depletion -------------------------------------------------------------------------------
def decay_matrix(T: int, decay: float, device) -> torch.Tensor:
    """D[t, s] = decay^(t − s) for s ≤ t, else 0: C = D @ X solves C_t = X_t + decay · C_{t−1}."""
    t = torch.arange(T, device=device, dtype=torch.float32)
    age = t[:, None] - t[None, :]
    return torch.where(age >= 0, decay ** age.clamp(min=0), torch.zeros((), device=device))


def stochastic_release(w: torch.Tensor, cfg: SynapticConfig) -> torch.Tensor:
    """A draw of k/n released vesicles, n = count cap, k ~ Binomial(n, w), with a gradient."""
    n = cfg.stochastic_count_cap
    if cfg.stochastic_mode == "normal_reparam":
        # the floor keeps sqrt's gradient finite where release saturates at exactly 0 or 1 (seen: NaN at step ~170)
        sd = torch.sqrt(((w * (1 - w)).clamp(min=0) + 1e-6) / n)
        return (w + sd * torch.randn_like(w)).clamp(0.0, 1.0)
    if cfg.stochastic_mode == "gumbel_sigmoid_ste":
        logit = torch.log(w.clamp(1e-6, 1 - 1e-6)) - torch.log1p(-w.clamp(1e-6, 1 - 1e-6))
        u = torch.rand((*w.shape, n), device=w.device).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logit[..., None] + torch.log(u) - torch.log1p(-u)) / cfg.stochastic_tau)
        hard = (soft > 0.5).to(w.dtype)
        return (hard + soft - soft.detach()).mean(-1)
    # n Bernoulli sites from uniforms of a fixed shape: the random stream never depends on the values
    k = (torch.rand((*w.shape, n), device=w.device) < w.detach()[..., None]).sum(-1).to(w.dtype)
    return w + (k / n - w).detach()


class PresynapticState(nn.Module):
    """Turns attention logits (B, H, T, T) into the bounded log-release bias, by a causal scan."""

    def __init__(self, cfg: SynapticConfig):
        super().__init__()
        self.cfg = cfg
        self.complexin = nn.Parameter(torch.zeros(cfg.n_head))
        self.gain = nn.Parameter(torch.ones(cfg.n_head))  # per head; 0 turns depletion off (``synapse enable``)
        self.last: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, H, T, _ = logits.shape
        dev = logits.device
        drive = torch.where(causal, F.softplus(logits), torch.zeros((), device=dev))
        influx = cfg.alpha_ca * (1.0 - 1.0 / cfg.tau_buf) * drive
        calcium = torch.einsum("ts,bhsj->bhtj", decay_matrix(T, 1.0 - 1.0 / cfg.tau_c, dev), influx)
        syt = calcium / (calcium + cfg.syt_fast_kd)
        pos = torch.arange(T, device=dev, dtype=torch.float32)
        primed = 1.0 - torch.exp(-(pos[:, None] - pos[None, :] + 1.0).clamp(min=0.0) / cfg.tau_prime)
        p = torch.sigmoid(3.0 * syt + 2.0 * primed - 2.0 * self.complexin.view(1, H, 1, 1)) * torch.sigmoid(logits)
        p = torch.where(causal, p, torch.zeros((), device=dev))
        sample_rows = None
        if self.training and cfg.stochastic and cfg.stochastic_train_frac > 0:
            sample_rows = torch.rand(B, 1, T, device=dev) < cfg.stochastic_train_frac  # query positions, drawn without looking at tokens
        rrp = torch.ones(B, H, T, device=dev, dtype=logits.dtype)
        released = []
        for t in range(T):  # query t sees the pool as queries before it left it
            w = torch.minimum(p[:, :, t], rrp)
            if sample_rows is not None:
                # a draw can exceed its mean, never the pool it comes from
                w = torch.where(sample_rows[:, :, t, None], torch.minimum(stochastic_release(w, cfg), rrp), w)
            released.append(w)
            rrp = rrp - w + (1.0 - rrp) / cfg.tau_rrp
        w_eff = torch.stack(released, dim=2)
        self.last = {"calcium_mean": float(calcium.detach()[causal.expand_as(calcium)].mean()), "rrp_mean": float(rrp.detach().mean())}
        return self.gain.view(1, H, 1, 1) * torch.log(w_eff + 1e-12).clamp(min=-cfg.depletion_bound)


class Attention(nn.Module):
    def __init__(self, cfg: SynapticConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.n_embd
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.presynaptic = PresynapticState(cfg) if cfg.presynaptic else None

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        H, hd = self.cfg.n_head, self.cfg.head_dim
        q, k, v = (p(x).view(B, T, H, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if self.presynaptic is not None:
            logits = logits + self.presynaptic(logits, causal)
        logits = logits.masked_fill(~causal, float("-inf"))
        y = torch.softmax(logits.float(), dim=-1).to(q.dtype) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))


# -- Hebbian fast weights ----------------------------------------------------------------------------------
class FastWeights(nn.Module):
    """The per-sequence fast state of one MLP output projection: y_fast_t = g · (P h_t)ᵀ M_{t−1} Q."""

    def __init__(self, cfg: SynapticConfig, in_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        r = cfg.rank_eligibility
        self.pre = nn.Linear(in_dim or cfg.intermediate, r, bias=False)  # P
        self.post = nn.Linear(cfg.n_embd, r, bias=False)  # Q (its weight, r × d, maps back out too)
        self.gain = nn.Parameter(torch.ones(()))  # g
        self.last: dict[str, float] = {}
        self.start = None  # a carried state (m, e, latch, drive sum, tokens seen) for the next forward only
        self.final = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # orthonormal rows: the projections keep the scale of what they read, so the fast path acts from the start
        nn.init.orthogonal_(self.pre.weight)
        nn.init.orthogonal_(self.post.weight)

    def forward(self, h: torch.Tensor, y_slow: torch.Tensor, slow_norm: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = h.shape
        r = cfg.rank_eligibility
        pre, post = self.pre(h), self.post(y_slow)  # (B, T, r)
        # co-activity directions: unit vectors, so the trace and the state are on one scale whatever the layer's
        pre_dir = pre / pre.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        post_dir = post / post.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        # activity: the token's MLP drive relative to the sequence's causal running mean of it
        start, self.start = self.start, None
        if start is None:  # a new sequence: the fast state starts empty
            zeros = torch.zeros(B, r, r, device=h.device, dtype=h.dtype)
            start = (zeros, zeros, torch.zeros(B, device=h.device, dtype=h.dtype), torch.zeros(B, device=h.device, dtype=h.dtype), 0)
        m, e, latch, drive_sum, seen = start
        drive = h.pow(2).mean(-1).sqrt()  # (B, T)
        running = (drive_sum[:, None] + drive.cumsum(1)) / (seen + torch.arange(1, T + 1, device=h.device, dtype=h.dtype))
        activity = torch.tanh(drive / running.clamp(min=1e-12))
        out = []
        for t in range(T):
            out.append(torch.einsum("br,brs->bs", pre[:, t], m))  # token t reads the state of tokens before it
            a = activity[:, t]
            x = a + latch
            latch = latch + ((x ** 4) / (0.5 ** 4 + x ** 4) - latch) / cfg.latch_tau
            gate = torch.sigmoid(cfg.camkii_gain * latch - cfg.pp1_gain)
            eta = cfg.hebb_eta * (1.0 + cfg.bdnf_gamma * a) if cfg.bdnf_gamma > 0 else cfg.hebb_eta
            e = cfg.rho_elig * e + torch.einsum("br,bs->brs", pre_dir[:, t], post_dir[:, t])
            m = m + (eta * gate)[:, None, None] * e
            norm = m.flatten(1).norm(dim=-1).clamp(min=1e-12)
            m = m * (cfg.fast_rel_max * slow_norm / norm).clamp(max=1.0)[:, None, None]
        fast = torch.stack(out, dim=1) @ self.post.weight  # (B, T, d): (P h)ᵀ M Q
        self.last = {"fast_state_norm": float(m.detach().flatten(1).norm(dim=-1).mean()), "latch_mean": float(latch.detach().mean())}
        self.final = (m.detach(), e.detach(), latch.detach(), (drive_sum + drive.sum(1)).detach(), seen + T)
        return self.gain * fast

    def fast_matrix(self, b: int = 0) -> torch.Tensor:
        """A = Pᵀ M Q (d_ff × d) of batch row b after the last forward pass (rank ≤ rank_eligibility)."""
        return (self.pre.weight.t() @ self.final[0][b] @ self.post.weight).detach()


class MLP(nn.Module):
    """SwiGLU, or (``moe``) the synaptic mixture of experts; fast weights on the output with ``hebbian``."""

    def __init__(self, cfg: SynapticConfig):
        super().__init__()
        self.experts = None
        if cfg.moe:
            from birdbone.synapse.moe import ExpertLayer, Metabolism

            meta = Metabolism(energy_cost_rel=cfg.energy_cost_rel, split_health_min=cfg.split_health_min,
                              router_contrastive_push=cfg.router_contrastive_push, max_experts=cfg.max_experts, min_experts=cfg.top_k)
            self.experts = ExpertLayer(cfg.n_embd, max(8, cfg.intermediate // cfg.experts), cfg.experts, cfg.top_k, meta)
        else:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate, bias=False)
            self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate, bias=False)
            self.down_proj = nn.Linear(cfg.intermediate, cfg.n_embd, bias=False)
        self.fast = FastWeights(cfg, cfg.n_embd if cfg.moe else cfg.intermediate) if cfg.hebbian else None

    def forward(self, x):
        if self.experts is not None:
            h, y = x, self.experts(x)
            slow = self.experts.down.detach().flatten(1).norm(dim=1).mean() if self.fast is not None else None
        else:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
            y = self.down_proj(h)
            slow = self.down_proj.weight.detach().norm() if self.fast is not None else None
        return y if self.fast is None else y + self.fast(h, y, slow)


class Block(nn.Module):
    def __init__(self, cfg: SynapticConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class SynapticGPT(nn.Module):
    """Module names follow transformers' llama, so a plain model's state dict loads into one."""

    def __init__(self, cfg: SynapticConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, FastWeights):
            m.reset_parameters()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, carry: list | None = None):
        """Logits (and the loss with ``targets``). ``carry``: the fast states of a previous chunk of the
        same sequences (from :meth:`carry`), to go on where it stopped; None starts each sequence fresh."""
        B, T = idx.shape
        fast = [block.mlp.fast for block in self.layers if block.mlp.fast is not None]
        if carry is not None:
            if len(carry) != len(fast):
                raise ValueError(f"carry holds {len(carry)} fast states, the model has {len(fast)}")
            for f, c in zip(fast, carry):
                f.start = c
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}")
        cos, sin = rotary(self.cfg.head_dim, T, self.cfg.rope_theta, idx.device)
        x = self.embed_tokens(idx)
        for block in self.layers:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        loss = None if targets is None else F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return logits, loss

    def neutralize_new(self, names: set[str]) -> None:
        """Set the mechanisms' gains among parameters ``names`` to 0: the model then computes exactly
        what the plain one did, and training decides how much of each mechanism to use."""
        with torch.no_grad():
            for n, p in self.named_parameters():
                if n in names and n.endswith(".gain"):
                    p.zero_()

    def carry(self) -> list:
        """The fast states at the end of the last forward pass, to hand to the next chunk."""
        return [block.mlp.fast.final for block in self.layers if block.mlp.fast is not None]

    def expert_layers(self) -> list:
        return [block.mlp.experts for block in self.layers if block.mlp.experts is not None]

    def fit_experts(self, state: dict) -> None:
        """Resize every expert layer to a checkpoint's expert counts (splits and merges change them)."""
        from birdbone.synapse.moe import fit_shapes

        for i, block in enumerate(self.layers):
            if block.mlp.experts is not None:
                fit_shapes(block.mlp.experts, state, f"layers.{i}.mlp.experts.")

    def vitals(self) -> dict[str, float]:
        """Means over layers of what the mechanisms reported in the last forward pass."""
        sums: dict[str, list[float]] = {}
        for layer in self.expert_layers():
            sums.setdefault("energy_mean", []).append(float(layer.energy.mean()))
            sums.setdefault("experts", []).append(float(layer.experts))
            sums.setdefault("health_max", []).append(float(layer.health.max()))
        for block in self.layers:
            for part in (block.self_attn.presynaptic, block.mlp.fast):
                for k, v in (part.last if part is not None else {}).items():
                    sums.setdefault(k, []).append(v)
        return {k: sum(v) / len(v) for k, v in sums.items()}
