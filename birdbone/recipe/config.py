"""A recipe: the whole loop from model to served GGUF as one typed config.

Stages run in one fixed order (:data:`STAGES`); a recipe lists the ones it wants in ``stages``
and every stage keeps its own section with the defaults of the verb it stands for (``waves`` is
``birdbone prune``'s config, ``budget`` is ``birdbone budget``'s plus its target, ...). YAML and
``--set`` go through :func:`birdbone.io.config.load_config` once, so a typo in a key, a value of
the wrong type or out of range is an error with file, line and column before any work starts;
the cross-stage checks (a guardrail that cannot be evaluated, a stage that needs another) live in
:meth:`Recipe.__post_init__`.

Shipped recipes live in ``birdbone/recipes/`` and are found by name (``-r gentle``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from birdbone.io.config import config_dict, load_config
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.inputs import regular_file
from birdbone.io.types import file_type
from birdbone.measure.config import ProfileConfig
from birdbone.remodel.budget import BudgetConfig
from birdbone.remodel.config import PruneConfig, ScaffoldConfig, StructureConfig

STAGES = ("map", "profile", "structure", "waves", "scaffold", "budget", "export", "verify")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_RECIPE = "gentle"


@dataclass(frozen=True)
class ProfileStage(ProfileConfig):
    """Usage profile of the model (``birdbone profile``): its imatrix feeds every later quantization."""

    def __post_init__(self):
        super().__post_init__()
        if not self.tokens:
            raise ValueError("profile: tokens must be set (a recipe reads a bounded share of its text)")


@dataclass(frozen=True)
class ScaffoldStage(ScaffoldConfig):
    """``birdbone scaffold``'s config, plus the layers to scaffold."""

    layers: str | None = None  # e.g. "0-3,10"; None: all


@dataclass(frozen=True)
class BudgetStage(BudgetConfig):
    """``birdbone budget``'s config plus its cap: bytes, or a llama.cpp mix whose size (with the same imatrix) to match."""

    target_bytes: str | None = "Q4_K_M"
    target_bpw: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if (self.target_bytes is None) == (self.target_bpw is None):
            raise ValueError("give exactly one of target_bytes and target_bpw (set the other to null)")


@dataclass(frozen=True)
class ExportStage:
    """The artifact: the budget's plan when there is one, else one llama.cpp file type."""

    type: str = "Q4_K_M"
    imatrix: bool = True  # quantize with the profile's importance matrix (needs the profile stage)

    def __post_init__(self):
        file_type(self.type)


@dataclass(frozen=True)
class VerifyStage:
    """Guardrails, judged in llama.cpp on held-out text against the float parent.

    Absolute: ``max_dppl_pct``, ``max_kld``, ``min_canary`` (share of canary prompts whose greedy
    continuation matches the parent's). Relative: ``reference`` names a llama.cpp mix quantized
    from the same float parent with the same importance matrix; the output must be no larger and
    its perplexity no worse (plus ``reference_slack_pct``). Unset guardrails are not judged."""

    holdout: float = 0.25  # tail of the calibration text kept for verification (when no separate eval text)
    tokens: int = 4096
    ctx: int = 512
    canary_tokens: int = 16
    decode: int = 64
    max_dppl_pct: float | None = None
    max_kld: float | None = None
    min_canary: float | None = None
    reference: str | None = None
    reference_slack_pct: float = 0.0

    def __post_init__(self):
        if not 0.0 < self.holdout < 1.0 or self.ctx < 16 or self.tokens < self.ctx:
            raise ValueError("holdout in (0, 1), ctx ≥ 16 and tokens ≥ ctx")
        if self.min_canary is not None and not self.canary_tokens:
            raise ValueError("min_canary cannot be evaluated with canary_tokens 0")
        if self.min_canary is not None and not 0.0 <= self.min_canary <= 1.0:
            raise ValueError(f"min_canary {self.min_canary} is a share in [0, 1]")
        if self.reference is not None:
            file_type(self.reference)


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    description: str = ""
    seed: int = 0  # one seed for every stage (it replaces the stages' own)
    stages: tuple[str, ...] = ("profile", "budget", "export", "verify")
    profile: ProfileStage = field(default_factory=ProfileStage)
    structure: StructureConfig = field(default_factory=StructureConfig)
    waves: PruneConfig = field(default_factory=PruneConfig)
    scaffold: ScaffoldStage = field(default_factory=ScaffoldStage)
    budget: BudgetStage = field(default_factory=BudgetStage)
    export: ExportStage = field(default_factory=ExportStage)
    verify: VerifyStage = field(default_factory=VerifyStage)

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown stage {unknown[0]!r} (stages, always run in this order: {', '.join(STAGES)})")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError("stages: a stage is listed twice")
        if "export" not in self.stages:
            raise ValueError("stages: the export stage is required (it writes the GGUF)")
        needs_profile = [why for why, needed in (
            ("the budget stage plans from the usage profile", "budget" in self.stages),
            ("export.imatrix quantizes with the profile's importance matrix", self.export.imatrix),
            (f"verify.reference compares with {self.verify.reference} made with the same importance matrix",
             "verify" in self.stages and self.verify.reference is not None and self.export.imatrix),
        ) if needed]
        if needs_profile and "profile" not in self.stages:
            raise ValueError(f"stages: add profile — {needs_profile[0]}")
        # the seed flows into every stage once, here, so the resolved recipe shows what ran
        object.__setattr__(self, "stages", tuple(s for s in STAGES if s in self.stages))
        object.__setattr__(self, "waves", replace(self.waves, seed=self.seed, heal=replace(self.waves.heal, seed=self.seed)))
        object.__setattr__(self, "structure", replace(self.structure, seed=self.seed, heal=replace(self.structure.heal, seed=self.seed)))
        object.__setattr__(self, "scaffold", replace(self.scaffold, seed=self.seed))
        object.__setattr__(self, "budget", replace(self.budget, sensitivity=replace(self.budget.sensitivity, seed=self.seed)))

    def has(self, stage: str) -> bool:
        return stage in self.stages

    def as_dict(self) -> dict:
        return config_dict(self)

    @property
    def sha256(self) -> str:
        """Hash of the resolved recipe (defaults applied): equal recipes hash equal however they were written."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


def recipe_path(name_or_path: str | Path | None) -> Path:
    """A shipped recipe by name (``gentle``, ``bird-bone``) or a YAML file."""
    name = str(name_or_path or DEFAULT_RECIPE)
    shipped = RECIPES / f"{name}.yaml"
    if shipped.is_file() and not Path(name).suffix:
        return shipped
    path = Path(name)
    if not path.exists() and not path.is_symlink():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise InputError(path, f"no such recipe file or shipped recipe (shipped: {known})")
    return regular_file(path, "recipe")


def load_recipe(name_or_path: str | Path | None = None, sets: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validate a recipe (shipped name or YAML file) and ``--set`` overrides into a :class:`Recipe`."""
    return load_config(Recipe, recipe_path(name_or_path), sets)


def unused_sections(recipe: Recipe, sets: list[str] | tuple[str, ...]) -> list[str]:
    """``--set`` keys aimed at stages the recipe does not run (their settings would be ignored)."""
    return [s.split("=", 1)[0] for s in sets if s.split(".", 1)[0] in STAGES and s.split(".", 1)[0] not in recipe.stages]


def check_out_path(out: Path, run_dir: Path) -> None:
    """The output GGUF must not live inside the run folder (a rerun would clean it away)."""
    out, run_dir = Path(out).resolve(), Path(run_dir).resolve()
    if run_dir == out or run_dir in out.parents:
        raise BirdboneError(f"{out}: the output must not be inside the run folder {run_dir}")


def flat(data: dict, prefix: str = "") -> dict:
    """Nested config data as dotted keys."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def diff_recipes(a: Recipe, b: Recipe) -> list[dict]:
    """Keys whose resolved values differ (defaults applied, so spelling and order do not count)."""
    fa, fb = flat(a.as_dict()), flat(b.as_dict())
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


@dataclass
class RecipeDiff:
    a: str
    b: str
    changes: list[dict]  # key, a, b

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "changes": self.changes}

    def render(self) -> list:
        from birdbone.io.report import Table

        table = Table(["key", self.a, self.b], title=f"recipe diff ({len(self.changes)} keys differ after defaults)")
        for c in self.changes:
            table.add(c["key"], json.dumps(c["a"]), json.dumps(c["b"]))
        return [table]


def is_recipe(name: str | Path) -> bool:
    """A recipe YAML, or a shipped recipe's name."""
    name = str(name)
    return name.endswith((".yaml", ".yml")) or (RECIPES / f"{name}.yaml").is_file()


@dataclass
class RecipeCheck:
    path: Path
    recipe: Recipe
    unused: list[str]  # --set keys aimed at stages the recipe does not run

    def as_dict(self) -> dict:
        return {"recipe": str(self.path), "name": self.recipe.name, "stages": list(self.recipe.stages), "sha256": self.recipe.sha256,
                "unused_sets": self.unused}

    def render(self) -> list:
        from birdbone.io.report import Line

        r = self.recipe
        return [Line(f"{self.path}: ok — {r.name}: {' → '.join(r.stages)} (sha256 {r.sha256[:12]})"),
                *(Line(unused_warning(k), "yellow") for k in self.unused)]


def unused_warning(key: str) -> str:
    return f"--set {key}: the {key.split('.')[0]} stage is not in this recipe's stages; the setting is unused"


def check_recipe(name_or_path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> RecipeCheck:
    """``birdbone recipe check``: validate a recipe without running it."""
    r = load_recipe(name_or_path, sets)
    return RecipeCheck(recipe_path(name_or_path), r, unused_sections(r, sets))


class ShownRecipe:
    """``birdbone recipe show``: a recipe with every default applied, as YAML."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def as_dict(self) -> dict:
        return self.recipe.as_dict()

    def render(self) -> list:
        import yaml

        from birdbone.io.report import Line

        return [Line(yaml.safe_dump(self.recipe.as_dict(), sort_keys=False).rstrip("\n"))]


def show_recipe(name_or_path: str | Path | None = None, sets: list[str] | tuple[str, ...] = ()) -> ShownRecipe:
    """A shipped recipe or YAML file with every default applied (none: the default of every key)."""
    return ShownRecipe(load_recipe(name_or_path, sets) if name_or_path else load_config(Recipe, None, sets))
