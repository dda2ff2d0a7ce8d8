"""``birdbone inspect``: what a model file is — architecture, parameters, bytes, anatomy, tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from birdbone.anatomy.roles import classify, summarize
from birdbone.io.report import Block, Line, Table, histogram, mib


@dataclass
class Inspection:
    info: dict  # path, format, architecture, files, counts, bytes, bits per weight, types, anatomy
    tensors: list[dict] = field(default_factory=list)  # name, role, layer, shape, type, bytes (empty: not asked for)

    def as_dict(self) -> dict:
        return {**self.info, "tensors": self.tensors or None}

    def render(self) -> list[Block]:
        i = self.info
        blocks: list[Block] = [
            Line(f"{i['path']}  ({i['format']}, {i['architecture']})", "bold"),
            Line(f"{i['n_tensors']} tensors, {i['n_params']:,} parameters, {mib(i['file_bytes'])} MiB on disk, "
                 f"{i['bits_per_weight']:.2f} bits per weight; types: {histogram(i['types'])}"),
            Line(family_line(i["family"])),
        ]
        anatomy = i["anatomy"]
        roles = Table(["role", "tensors", "parameters", "MiB", "% of bytes"], title="anatomy")
        for role, c in anatomy["roles"].items():
            if c["n_tensors"]:
                roles.add(role, c["n_tensors"], f"{c['n_params']:,}", mib(c["n_bytes"]),
                          f"{100 * c['n_bytes'] / max(anatomy['total']['n_bytes'], 1):.1f}")
        layers = Table(["layer", "skeleton MiB", "organ MiB", "norm KiB", "parameters"], title="per layer")
        for layer in anatomy["layers"]:
            r = layer["roles"]
            layers.add(layer["layer"], mib(r["skeleton"]["n_bytes"]), mib(r["organ"]["n_bytes"]), f"{r['norm']['n_bytes'] / 1024:.1f}",
                       f"{layer['n_params']:,}")
        blocks += [roles, layers]
        if self.tensors:
            table = Table(["name", "role", "layer", "shape", "type", "bytes"])
            for r in self.tensors:
                table.add(r["name"], r["role"], "" if r["layer"] is None else r["layer"], "×".join(map(str, r["shape"])), r["type"], f"{r['bytes']:,}")
            blocks.append(table)
        return blocks


def family_info(m) -> dict:
    """What the family table says of this model: its family, whether the torch verbs take it, and
    the traits that set it apart (a tied head, q/k/v biases, q/k norms, gemma's norm offset ...)."""
    from birdbone.io.errors import BirdboneError
    from birdbone.io.families import family_of_file, family_of_model_type, traits

    tied = "output.weight" not in m.tensors and "lm_head.weight" not in m.tensors
    config = m.metadata.get("config", {}) if m.format != "gguf" else {}
    moe = {"experts": int(m.meta(f"{m.architecture}.expert_count", 0) or config.get("num_local_experts") or config.get("num_experts") or 0),
           "experts_per_token": int(m.meta(f"{m.architecture}.expert_used_count", 0) or config.get("num_experts_per_tok") or 0)}
    try:
        fam = family_of_file(m) if m.format == "gguf" else family_of_model_type(config.get("model_type"))
    except BirdboneError as e:
        return {"family": None, "torch": False, "why": str(e), "tied_embeddings": tied, **moe}
    return {"family": fam.model_type, "torch": True, "why": None, "tied_embeddings": tied, "traits": traits(fam), **moe}


def family_line(f: dict) -> str:
    head = "tied head" if f["tied_embeddings"] else "untied head"
    if f.get("experts"):
        head += f", {f['experts']} experts ({f['experts_per_token']} per token)"
    if not f["torch"]:
        return f"family: {head}; the torch verbs (profile, prune, heal, budget, compress) refuse it: {f['why']}"
    return f"family: {f['family']} ({', '.join([head, *f['traits']])}); every verb takes it"


def inspect_model(model: str | Path = "builtin", tensors: bool = True) -> Inspection:
    """Architecture, parameters, bytes, types, anatomy per role and layer, and (optionally) every tensor."""
    from birdbone.io.model_file import open_model

    with open_model(model) as m:
        hist: dict[str, int] = {}
        for t in m.tensors.values():
            hist[t.type] = hist.get(t.type, 0) + 1
        info = {
            "path": str(m.path), "format": m.format, "architecture": m.architecture, "files": [str(p) for p in m.files],
            "n_tensors": len(m.tensors), "n_params": m.n_params, "file_bytes": m.file_bytes, "tensor_bytes": m.tensor_bytes,
            "bits_per_weight": 8.0 * m.tensor_bytes / max(m.n_params, 1), "types": hist,
            "metadata_keys": len(m.metadata) if m.format == "gguf" else len(m.metadata.get("config", {})),
            "anatomy": summarize(m.tensors), "family": family_info(m),
        }
        rows = []
        if tensors:
            for t in m.tensors.values():
                a = classify(t.name)
                rows.append({"name": t.name, "role": a.role, "layer": a.layer, "shape": list(t.shape), "type": t.type, "bytes": t.n_bytes})
    return Inspection(info, rows)
