"""Every tensor's anatomical role, read from its name: :func:`classify` and :func:`summarize`.

Roles: ``skeleton`` (attention), ``organ`` (feed-forward, experts, router), ``embed`` (token and
position embeddings, output heads), ``norm``, ``adapter`` (LoRA) and ``other`` (rope tables and
anything unknown, which is reported, never dropped). Each tensor also gets its layer index and
an organ name from one vocabulary, gguf-py's tensor kind names (``attn_q``, ``ffn_up_exps``).

All naming knowledge lives in :mod:`birdbone.anatomy.roles_table`, read here once into a few
dicts and compiled regexes; the matching rules are described there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from birdbone.anatomy import roles_table as _t

ROLES: tuple[str, ...] = ("skeleton", "organ", "embed", "norm", "adapter", "other")
UNKNOWN = "unknown"  # the organ of a tensor no table entry or fallback recognizes


@dataclass(frozen=True)
class Anatomy:
    role: str  # one of ROLES
    layer: int | None  # None for tensors outside the layer stack (embeddings, heads, rope)
    organ: str  # gguf-py kind name; for an adapter, the organ it attaches to


class _Tensor(Protocol):
    name: str
    n_bytes: int
    n_params: int


def _load_tables() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """organ -> role, layer tail -> organ, model name -> organ; a name claimed twice is an error."""
    organ_roles: dict[str, str] = {}
    block: dict[str, str] = {}
    model: dict[str, str] = {}
    for organ, entry in _t.ORGANS.items():
        if entry["role"] not in ROLES or entry["role"] == "adapter":
            raise ValueError(f"roles_table: organ {organ!r} has role {entry['role']!r}")
        extra = set(entry) - {"role", "block", "model"}
        if extra:
            raise ValueError(f"roles_table: organ {organ!r} has unknown keys {sorted(extra)}")
        organ_roles[organ] = entry["role"]
        for where, names in ((block, entry.get("block", ())), (model, entry.get("model", ()))):
            for name in names:
                if name in where and where[name] != organ:
                    raise ValueError(f"roles_table: {name!r} is listed under {where[name]!r} and {organ!r}")
                where[name] = organ
    return organ_roles, block, model


ORGAN_ROLES, _BLOCK, _MODEL = _load_tables()
ORGANS: tuple[str, ...] = tuple(ORGAN_ROLES)
AMBIGUOUS: dict[str, tuple[str, ...]] = dict(_t.AMBIGUOUS)

_SUFFIXES = frozenset(_t.SUFFIXES)
_LAYER_CONTAINERS = frozenset(_t.LAYER_CONTAINERS)
_EXPERT_CONTAINERS = frozenset(_t.EXPERT_CONTAINERS)
_ADAPTER = re.compile("|".join(f"(?:{p})" for p in _t.ADAPTER_MARKERS))
_FALLBACKS = tuple((re.compile(f["pattern"]), f["role"], f.get("organ")) for f in _t.FALLBACKS)
if not {role for _, role, _ in _FALLBACKS} <= set(ROLES):
    raise ValueError("roles_table: a fallback names an unknown role")


@lru_cache(maxsize=1 << 16)
def classify(name: str) -> Anatomy:
    """The role, layer and organ of the tensor called ``name`` (GGUF, HF or PEFT spelling)."""
    segs = name.split(".")
    adapter = False
    for i, seg in enumerate(segs):
        if _ADAPTER.fullmatch(seg):
            segs, adapter = segs[:i], True
            break
    if segs and segs[-1] in _SUFFIXES:
        segs = segs[:-1]

    layer, tail = _split_layer(segs)
    if tail is not None:
        organ = _BLOCK.get(".".join(_drop_expert_index(tail)))
    else:
        organ = _match_model_name(segs)

    if organ is not None:
        role = ORGAN_ROLES[organ]
    else:
        role, organ = _fall_back(".".join(segs))
    return Anatomy("adapter" if adapter else role, layer, organ)


def _split_layer(segs: list[str]) -> tuple[int | None, list[str] | None]:
    """``model.layers.3.self_attn.q_proj`` -> (3, ['self_attn', 'q_proj']); no layer -> (None, None)."""
    for i in range(len(segs) - 1):
        if segs[i] in _LAYER_CONTAINERS and segs[i + 1].isdigit():
            return int(segs[i + 1]), segs[i + 2 :]
    return None, None


def _drop_expert_index(tail: list[str]) -> list[str]:
    """``mlp.experts.7.down_proj`` -> ``mlp.experts.down_proj``: one organ for all experts."""
    out = []
    for i, seg in enumerate(tail):
        if seg.isdigit() and i > 0 and tail[i - 1] in _EXPERT_CONTAINERS:
            continue
        out.append(seg)
    return out


def _match_model_name(segs: list[str]) -> str | None:
    """Longest dotted suffix first: ``bert.embeddings.LayerNorm`` hits ``embeddings.LayerNorm``."""
    for i in range(len(segs)):
        organ = _MODEL.get(".".join(segs[i:]))
        if organ is not None:
            return organ
    return None


def _fall_back(stem: str) -> tuple[str, str]:
    for pattern, role, organ in _FALLBACKS:
        m = pattern.fullmatch(stem)
        if m:
            return role, organ or m.groupdict().get("organ") or UNKNOWN
    return "other", UNKNOWN


def summarize(tensors: Iterable[_Tensor] | Mapping[str, _Tensor]) -> dict[str, Any]:
    """Bytes, parameters and tensor counts per role, per layer and per role within each layer.

    ``tensors``: objects with ``.name``, ``.n_bytes``, ``.n_params`` (``TensorInfo``), or a
    mapping of them (``ModelFile.tensors``). Every role appears in every ``roles`` dict, zero or
    not, so reports line up. ``unlayered`` holds the tensors outside the layer stack and
    ``unknown`` the names no rule recognized. Plain ints, strings and lists: ``json.dumps`` works.
    """
    if isinstance(tensors, Mapping):
        tensors = tensors.values()
    total, roles = _counts(), {r: _counts() for r in ROLES}
    layers: dict[int, dict[str, Any]] = {}
    unlayered = {**_counts(), "roles": {r: _counts() for r in ROLES}}
    unknown: list[str] = []
    for t in tensors:
        a = classify(t.name)
        n_bytes, n_params = int(t.n_bytes), int(t.n_params)
        if a.layer is None:
            where = unlayered
        else:
            where = layers.setdefault(a.layer, {**_counts(), "roles": {r: _counts() for r in ROLES}})
        for c in (total, roles[a.role], where, where["roles"][a.role]):
            c["n_tensors"] += 1
            c["n_bytes"] += n_bytes
            c["n_params"] += n_params
        if a.organ == UNKNOWN:
            unknown.append(t.name)
    return {
        "total": total,
        "roles": roles,
        "layers": [{"layer": i, **layers[i]} for i in sorted(layers)],
        "unlayered": unlayered,
        "unknown": sorted(unknown),
    }


def _counts() -> dict[str, int]:
    return {"n_tensors": 0, "n_bytes": 0, "n_params": 0}
