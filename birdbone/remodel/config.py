"""The remodel room's configs, as typed, checked dataclasses (importing them loads no torch).

One place for each: :class:`HealConfig` (LoRA healing), :class:`StopLoss` and :class:`PruneConfig`
(the bird-bone loop, ``birdbone prune``), :class:`ScaffoldConfig` (``birdbone scaffold``). A field's
comment is its documentation: ``--help`` and the CLI's flags read it from here
(:func:`birdbone.io.config.field_docs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from birdbone.io.errors import BirdboneError
from birdbone.remodel.masks import ALLOCATIONS, MAX_WAVE, SCORES, check_wave, parse_granularity

LR_1 = 2e-4  # the plan's first-wave learning rate
KEEP_RULES = ("rms", "quantile")


@dataclass(frozen=True)
class HealConfig:
    steps: int = 40  # LoRA healing steps after the first wave, tapering after (0: no healing; ~5 s a step of 4×128 tokens on the built-in model, CPU)
    lr: float = LR_1
    rank: int = 8
    alpha: float = 16.0
    batch: int = 4
    seq: int = 128
    kd_weight: float = 0.0  # weight of KL(parent ‖ model) next to cross-entropy
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.rank < 1 or self.batch < 1 or self.seq < 2 or self.kd_weight < 0:
            raise BirdboneError(f"heal config out of range: {self}")

    def for_wave(self, k: int, total_waves: int) -> "HealConfig":
        """The plan's taper: E_k = E_1(1 − (k−1)/R) steps and lr_k = lr_1(1 − (k−1)/R) for wave k of R."""
        f = max(0.0, 1.0 - (k - 1) / max(total_waves, 1))
        steps = max(1, math.ceil(self.steps * f)) if self.steps else 0  # zero means no healing, in every wave
        return HealConfig(steps, self.lr * max(f, 1e-3), self.rank, self.alpha, self.batch,
                          self.seq, self.kd_weight, self.seed + k)


@dataclass(frozen=True)
class StopLoss:
    threshold_pct: float = 3.0  # Δppl vs the unpruned model that counts as suffering (the plan's 3 %)
    patience: int = 2  # consecutive suffering waves before pruning stops
    rollback_waves: int = 3  # N_rb: waves that each give back a third of the last wave's weights

    def __post_init__(self):
        if self.threshold_pct <= 0 or self.patience < 1 or self.rollback_waves < 1:
            raise ValueError(f"stop_loss out of range: {self}")


@dataclass(frozen=True)
class PruneConfig:
    target_density: float = 0.7  # share of each prunable weight to keep, in (0, 1]
    max_wave: float = MAX_WAVE  # most of what is still alive one wave sheds (the plan's tenth)
    score: str = "wanda"  # magnitude, wanda, taylor (needs gradients) or usage
    granularity: str = "row"  # row, or N:M such as 2:4
    roles: tuple[str, ...] = ("skeleton", "organ")
    heal: HealConfig = field(default_factory=HealConfig)
    stop_loss: StopLoss = field(default_factory=StopLoss)
    holdout: float = 0.1  # share of the text kept for the guardrail
    eval_tokens: int = 2048
    eval_ctx: int = 256
    calibration_tokens: int = 4096  # profiled for the wanda / usage / taylor scores
    reinforce: bool = True  # extra healing for layers under stress (recorded per wave in metrics.jsonl)
    stress_delta: float = 0.01  # δ: a layer is stressed when the output error it adds grew by more than this
    stress_gamma: float = 2.0  # γ: ... or its gradient norm is above γ × the mean over layers
    reinforce_share: float = 0.5  # extra steps for stressed layers, as a share of the wave's healing steps
    rigl: float = 0.0  # share of each row's pruned weights regrown per wave after healing (≤ 0.05; 0: off)
    qlora: str = ""  # heal against the base fake-quantized to this llama.cpp type (e.g. Q4_K); "": float
    allocation: str = "uniform"  # uniform, or alpha: per-tensor densities from the baseline map's α (AlphaPruning)
    allocation_spread: float = 0.1  # alpha: densities span target ± this before the mean is restored
    seed: int = 0

    def __post_init__(self):
        check_wave(self.max_wave, self.target_density)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and parse_granularity(self.granularity).kind != "row":
            raise ValueError("allocation from the map works with row granularity (N:M fixes every tensor's density)")
        if self.score not in SCORES:
            raise ValueError(f"score {self.score!r}: choose one of {', '.join(SCORES)}")
        g = parse_granularity(self.granularity)
        if g.implied_density is not None and not math.isclose(g.implied_density, self.target_density):
            raise ValueError(f"granularity {self.granularity} means target_density {g.implied_density:g}")
        if not set(self.roles) <= {"skeleton", "organ", "other"}:
            raise ValueError(f"roles {self.roles}: prunable roles are skeleton, organ, other (never embed or norm)")
        if not 0.0 <= self.rigl <= 0.05:
            raise ValueError(f"rigl {self.rigl} is outside [0, 0.05]")
        if self.rigl and g.kind != "row":
            raise ValueError("rigl regrowth works with row granularity only")
        if self.qlora:
            from birdbone.io.types import tensor_type

            tensor_type(self.qlora)
        if not 0.0 < self.holdout < 0.5 or self.eval_tokens < 2 * self.eval_ctx or self.eval_ctx < 16:
            raise ValueError("holdout must be in (0, 0.5) and eval_tokens at least two windows of eval_ctx (≥ 16)")

    @property
    def expected_waves(self) -> int:
        """R: waves of max_wave each needed to reach the target (the healing taper's horizon)."""
        lowest = self.target_density - (self.allocation_spread if self.allocation != "uniform" else 0.0)
        if lowest >= 1.0:
            return 1
        return max(1, math.ceil(math.log(max(lowest, 1e-3)) / math.log(1.0 - self.max_wave)))


@dataclass(frozen=True)
class ScaffoldConfig:
    rank: int = 5  # R: steps, one rank more each
    keep: str = "rms"  # rms: keep |R_k| > c·RMS(R_k); quantile: keep |R_k| above its q-quantile
    c: float = 1.0
    quantile: float = 0.5
    activation_aware: bool = True
    roles: tuple[str, ...] = ("skeleton", "organ")
    stop_loss_pct: float = 3.0  # held-out loss rise (%) that halves the residual threshold
    max_halvings: int = 4
    bundles: int = 2  # M
    heal: HealConfig = field(default_factory=lambda: HealConfig(steps=8))
    val_tokens: int = 1024
    val_ctx: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1 or self.bundles < 1 or self.max_halvings < 0 or self.stop_loss_pct <= 0:
            raise ValueError("rank ≥ 1, bundles ≥ 1, max_halvings ≥ 0 and stop_loss_pct > 0")
        if self.keep not in KEEP_RULES:
            raise ValueError(f"keep {self.keep!r}: choose one of {', '.join(KEEP_RULES)}")
        if self.c < 0 or not 0.0 <= self.quantile < 1.0:
            raise ValueError("c ≥ 0 and quantile in [0, 1)")
        if self.val_ctx < 16 or self.val_tokens < self.val_ctx:
            raise ValueError("val_tokens ≥ val_ctx ≥ 16")


# -- pure parts -------------------------------------------------------------------------------------


STRUCTURE_SCORES = ("activation", "fluctuation", "wanda", "loo")
STRUCTURE_UNITS = ("ffn", "qhead", "group")
LAYER_SCORES = ("influence", "loo")


@dataclass(frozen=True)
class StructureConfig:
    """Structured density loss (``birdbone prune --structured``, a recipe's structure stage)."""

    target: float = 0.85  # share of the block matrices' parameters to keep, in (0, 1] (whole layers and width units together)
    score: str = "loo"  # width units: activation (Minitron), fluctuation (FLAP: variance × column norm², meant for bias compensation), wanda (Wanda-sp: mean square × column norm²) or loo (measured Δloss: heads and groups alone; FFN channels by wanda within a layer, scaled by the measured Δloss of removing the layer's weakest quarter)
    units: tuple[str, ...] = STRUCTURE_UNITS  # what the width target removes: ffn channels, qhead (one query head from every group of a layer), group (a key/value group with its heads)
    drop_layers: int = 0  # whole layers to remove first, lowest layer score first (0: none)
    min_groups: int = 1  # key/value groups every layer keeps (0 lets a layer lose its attention; the first layer always keeps one)
    layer_score: str = "influence"  # influence (ShortGPT: 1 − cos(input, output)) or loo (measured Δloss with the layer left out)
    hidden: int = 0  # hidden width to cut to (Minitron; e.g. 512 lets K-quants take 576-wide rows); 0 keeps every channel
    ffn_multiple: int = 32  # each layer's FFN width is a multiple of this (32: the legacy types' blocks; 256: K-quants')
    hidden_multiple: int = 32  # the hidden width must be a multiple of this
    arch: str = "auto"  # auto (llama when every layer keeps the same widths, else deci) or llama (the same widths in every layer: Minitron's shape)
    max_wave: float = MAX_WAVE  # most of the remaining block parameters one wave removes (the plan's tenth)
    oneshot: bool = False  # remove everything in one wave, then heal for the steps the waves would have had in total
    heal: HealConfig = field(default_factory=lambda: HealConfig(steps=40, kd_weight=1.0))
    stop_loss: StopLoss = field(default_factory=lambda: StopLoss(threshold_pct=30.0))
    holdout: float = 0.1  # share of the text kept for the guardrail
    eval_tokens: int = 2048
    eval_ctx: int = 256
    calibration_tokens: int = 4096  # profiled for the scores (first and second moments of every input)
    text_tokens: int = 65536  # most calibration tokens healing reads (a long text is cut, so a run's time does not grow with it)
    loo_windows: int = 2  # calibration windows (eval_ctx each) per leave-one-out pass; ~180 passes, so 2 keep it to minutes
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target {self.target} is outside (0, 1]: it is the share of block parameters kept")
        if self.score not in STRUCTURE_SCORES or self.layer_score not in LAYER_SCORES:
            raise ValueError(f"score: {', '.join(STRUCTURE_SCORES)}; layer_score: {', '.join(LAYER_SCORES)}")
        if not set(self.units) <= set(STRUCTURE_UNITS):
            raise ValueError(f"units {self.units}: choose from {', '.join(STRUCTURE_UNITS)}")
        if self.min_groups < 0 or self.drop_layers < 0 or self.hidden < 0 or self.ffn_multiple < 1 or self.hidden_multiple < 1 or self.loo_windows < 1 or self.text_tokens < 256:
            raise ValueError("drop_layers ≥ 0, hidden ≥ 0, ffn_multiple ≥ 1, hidden_multiple ≥ 1, loo_windows ≥ 1, text_tokens ≥ 256")
        if self.hidden and self.hidden % self.hidden_multiple:
            raise ValueError(f"hidden {self.hidden} is not a multiple of hidden_multiple {self.hidden_multiple}: it would break the quant type's blocks")
        if not 0.0 < self.max_wave <= 0.5:
            raise ValueError(f"max_wave {self.max_wave} is outside (0, 0.5]")
        if self.arch not in ("auto", "llama"):
            raise ValueError(f"arch {self.arch!r}: auto or llama")
        if not 0.0 < self.holdout < 0.5 or self.eval_tokens < 2 * self.eval_ctx or self.eval_ctx < 16:
            raise ValueError("holdout must be in (0, 0.5) and eval_tokens at least two windows of eval_ctx (≥ 16)")

    @property
    def expected_waves(self) -> int:
        """Waves of max_wave each to reach the target (the healing taper's horizon)."""
        if self.oneshot or self.target >= 1.0:
            return 1
        return max(1, math.ceil(math.log(self.target) / math.log(1.0 - self.max_wave)))
