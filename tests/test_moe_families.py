"""Mixture-of-experts GGUFs, one row per family (qwen2moe, qwen3moe, mixtral): tiny random files
as llama.cpp's converter writes them (tests/fixtures/tiny.make_tiny_moe). The file-level verbs take
them; the torch verbs, which have no expert map yet, refuse in one line that says so."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.tiny import MOE_ROWS, make_tiny_moe
from tests.test_cli import birdbone


@pytest.fixture(scope="module", params=MOE_ROWS)
def moe(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, make_tiny_moe(root / "base.gguf", request.param), make_tiny_moe(root / "donor.gguf", request.param, seed=1)


def raw(path) -> dict[str, bytes]:
    from birdbone.io.model_file import open_model

    with open_model(path) as m:
        return {n: m.raw(n).tobytes() for n in m.tensors}


def test_inspect_counts_the_experts_and_says_the_torch_verbs_refuse(moe):
    from birdbone.anatomy.inspect import inspect_model

    kind, base, _ = moe
    r = inspect_model(base, tensors=True)
    f = r.info["family"]
    assert f["experts"] == 4 and f["experts_per_token"] == 2 and f["torch"] is False and "mixture of experts" in f["why"], f
    organs = {t["name"]: t["role"] for t in r.tensors if "exps" in t["name"] or "gate_inp" in t["name"]}
    assert organs and set(organs.values()) == {"organ"}, organs  # experts and routers are organs, by the roles table
    line = birdbone("inspect", base).stdout
    assert "4 experts (2 per token)" in line and "refuse" in line


def test_dissect_and_assemble_give_the_same_bytes(moe, tmp_path):
    kind, base, _ = moe
    birdbone("dissect", base, "-o", tmp_path / "organs")
    manifest = json.loads((tmp_path / "organs" / "manifest.json").read_text())
    assert any("ffn_gate_exps" in json.dumps(t) for t in manifest["tensors"])
    birdbone("assemble", tmp_path / "organs", "-o", tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == base.read_bytes()


def test_measure_reads_every_expert_tensor(moe):
    kind, base, _ = moe
    r = json.loads(birdbone("measure", base, "--json").stdout)
    experts = [t for t in r["tensors"] if t["name"].endswith("_exps.weight")]
    assert len(experts) == 6 and all(len(t["shape"]) == 3 and t["theta"] is not None for t in experts), experts[:1]
    # a stack of experts has no one matrix spectrum: skipped, with the reason, never a number made up
    assert all(t["status"]["spectrum"] == "skipped" and "3-D" in t["reasons"]["spectrum"] for t in experts)
    router = next(t for t in r["tensors"] if t["name"] == "blk.0.ffn_gate_inp.weight")
    assert router["spectrum"]["n_values"] == 4  # the router is a matrix (experts × width): measured


def test_quantize_writes_the_experts_and_llama_cpp_runs_them_near_the_parent(moe, tmp_path):
    from birdbone.io.model_file import open_model

    kind, base, _ = moe
    birdbone("quantize", base, "--type", "Q8_0", "-o", tmp_path / "q8.gguf")
    with open_model(tmp_path / "q8.gguf") as m:
        assert {m.tensors[n].type for n in m.tensors if n.endswith("_exps.weight")} == {"Q8_0"}
    r = json.loads(birdbone("eval", tmp_path / "q8.gguf", "--parent", base, "--tokens", "128", "--ctx", "64", "--json").stdout)
    assert 0 < r["kld_mean"] < 0.01, r


def test_per_tensor_types_apply_and_budget_says_why_it_cannot_plan(moe, tmp_path):
    from birdbone.io.model_file import open_model

    kind, base, _ = moe
    birdbone("quantize", base, "--type", "Q8_0", "--tensor-type", "ffn_down_exps=Q4_0", "-o", tmp_path / "q.gguf")
    with open_model(tmp_path / "q.gguf") as m:
        types = {n: m.tensors[n].type for n in m.tensors if "_exps" in n}
    assert types and all(t == ("Q4_0" if "down" in n else "Q8_0") for n, t in types.items()), types
    p = birdbone("budget", base, "--target-bpw", "5", "-o", tmp_path / "made.json", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "mixture of experts" in p.stderr, p.stderr
    assert "quantize --tensor-type" in p.stderr and not (tmp_path / "made.json").exists()


def test_graft_moves_one_layers_experts_and_refuses_another_expert_count(moe, tmp_path):
    kind, base, donor = moe
    birdbone("graft", "--base", base, "--donor", donor, "--layers", "1", "--roles", "organ", "-o", tmp_path / "chimera.gguf")
    got, b, d = raw(tmp_path / "chimera.gguf"), raw(base), raw(donor)
    moved = {n for n in got if got[n] != b[n]}
    assert moved and all(n.startswith("blk.1.") and got[n] == d[n] for n in moved), sorted(moved)
    assert "blk.1.ffn_gate_exps.weight" in moved and "blk.1.ffn_gate_inp.weight" in moved
    r = json.loads(birdbone("eval", tmp_path / "chimera.gguf", "--parent", base, "--tokens", "128", "--ctx", "64", "--json").stdout)
    assert r["kld_mean"] > 0, r  # llama.cpp runs the chimera, and it is another model
    wide = make_tiny_moe(tmp_path / "eight.gguf", kind, experts=8, seed=2)
    p = birdbone("graft", "--base", base, "--donor", wide, "--layers", "1", "--roles", "organ", "-o", tmp_path / "x.gguf", check=False)
    assert p.returncode == 2 and "blk.1.ffn_gate_exps.weight: shape base [4, 32, 64], donor [8, 32, 64]" in p.stderr, p.stderr
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("verb", [
    ["profile", "--ctx", "64", "--tokens", "128"],
    ["prune", "--target-density", "0.8", "--heal-steps", "1"],
    ["compress"],
])
def test_the_torch_verbs_refuse_in_one_line(moe, tmp_path, verb):
    kind, base, _ = moe
    extra = ["--run-dir", tmp_path / "run"] if verb[0] == "prune" else []
    p = birdbone(verb[0], base, *verb[1:], *extra, "-o", tmp_path / "out", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "experts" in p.stderr and "mixture of experts" in p.stderr and not (tmp_path / "out").exists(), p.stderr


def test_a_recipe_without_torch_stages_compresses_a_mixture_of_experts(moe, tmp_path):
    """map, export (no imatrix) and verify only read files: the refusal is for the torch stages, not for compress."""
    kind, base, _ = moe
    (tmp_path / "files.yaml").write_text("name: files-only\nstages: [map, export, verify]\nexport: {type: Q8_0, imatrix: false}\n"
                                         "verify: {tokens: 128, ctx: 64, canary_tokens: 4, decode: 4, max_kld: 0.01}\n")
    r = json.loads(birdbone("compress", base, "-r", tmp_path / "files.yaml", "-o", tmp_path / "c.gguf", "--json").stdout)
    assert r["passed"] is True and list(r["stages"]) == ["map", "export", "verify"], r


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_converting_a_mixture_of_experts_folder_is_one_line(tmp_path, model_type):
    from birdbone.bridge.convert import convert
    from birdbone.io.errors import BirdboneError
    from tests.fixtures.tiny import make_tiny_family

    hf, _ = make_tiny_family(tmp_path, "qwen2")
    config = json.loads((hf / "config.json").read_text()) | {"model_type": model_type}
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(BirdboneError, match=f"model_type '{model_type}' is not supported yet \\(a mixture of experts"):
        convert(hf, tmp_path / "x.gguf", "F32")
    assert not (tmp_path / "x.gguf").exists()
