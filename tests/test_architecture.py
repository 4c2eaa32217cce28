"""The package's layering: data flows one way, ds/pp -> models -> transcoders -> circuits -> tl -> get/pl -> report/cli.

The import graph is read from the source (every import, function-local and type-only ones included), so a back-edge
or a cycle hidden inside a function fails here. ``python tests/test_architecture.py`` prints the graph's facts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import networkx as nx

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cellcircuits"

#: Each top-level part of the package and its layer: a module may import only from its own layer or lower ones.
LAYERS = {
    "_version": 0,
    "_compat": 0,
    "_docs": 0,
    "ds": 0,
    "pp": 0,
    "models": 1,
    "transcoders": 2,
    "circuits": 3,
    "_keys": 4,
    "tl": 4,
    "get": 5,
    "pl": 5,
    "_report": 6,
    "_pipeline": 6,
    "_cli_checks": 6,
    "_outputs": 6,
    "cli": 6,
    "__main__": 6,
    "": 6,  # the package root, which loads its subpackages lazily
}
#: Packages that work on prompts, ids and tensors and never see AnnData.
TENSOR_PACKAGES = ("models", "transcoders", "circuits")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom, known: set[str]) -> list[str]:
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    if not target.startswith(PACKAGE):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return out


def import_graph() -> nx.DiGraph:
    """Module -> imported module, for every import of the package by the package."""
    mods = modules()
    known = set(mods)
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node, known)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(PACKAGE)]
            else:
                continue
            for target in targets:
                while target not in known:  # `import cellcircuits.x.y` of a name, not a module
                    target = target.rpartition(".")[0]
                if target != name:
                    graph.add_edge(name, target)
    return graph


def part(module: str) -> str:
    """The top-level part of the package a module belongs to (``""`` for the root)."""
    return module.split(".")[1] if "." in module else ""


def back_edges(graph: nx.DiGraph) -> list[tuple[str, str]]:
    return [(a, b) for a, b in graph.edges if LAYERS[part(b)] > LAYERS[part(a)]]


def package_cycles(graph: nx.DiGraph) -> list[list[str]]:
    parts = nx.DiGraph((part(a), part(b)) for a, b in graph.edges if part(a) != part(b))
    return list(nx.simple_cycles(parts))


def test_every_part_has_a_layer():
    assert {part(m) for m in modules()} <= set(LAYERS)


def test_no_back_edges():
    bad = back_edges(import_graph())
    assert not bad, "imports against the data flow: " + ", ".join(f"{a} -> {b}" for a, b in bad)


def test_no_cycles_between_modules_or_packages():
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"module import cycles: {cycles}"
    assert not package_cycles(graph)


def test_tensor_layers_do_not_import_anndata_or_scanpy():
    mods = modules()
    for name, path in mods.items():
        if part(name) not in TENSOR_PACKAGES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("anndata", "scanpy") for n in names), name


def test_no_private_names_across_packages():
    """A module imports from another package only public names (no leading underscore), as that package's API."""
    mods = modules()
    known = set(mods)
    bad = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            for target in set(_resolve(name, path.name == "__init__.py", node, known)):
                if part(target) == part(name) or target == PACKAGE:
                    continue
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                bad += [f"{name}: {a} from {target}" for a in private]
    assert not bad, bad


RAW_PROMPT_TRACE = textwrap.dedent(
    """
    import sys

    sys.modules["anndata"] = None  # any import of anndata or scanpy now raises ImportError
    sys.modules["scanpy"] = None

    import numpy as np
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from cellcircuits import circuits, models, transcoders
    from cellcircuits.pp import PromptConfig

    torch.manual_seed(0)
    labels = ["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]
    genes = ["CD14", "LYZ", "HLA-DRA", "MS4A1", "CD79A", "NKG7", "GNLY", "CD3E"]
    config = PromptConfig(n_genes=6, labels=labels, append_eos=True)
    texts = [" ".join(np.random.default_rng(i).permutation(genes)[:6]) for i in range(60)]
    from cellcircuits.pp import build_prompt

    tok = models.train_tokenizer([build_prompt(t, config).text + " " + labels[i % 3] for i, t in enumerate(texts)], 300)
    hf = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25)
    ).eval()
    model = models.C2SModel(model=hf, tokenizer=tok, adapter=models.ModelAdapter(hf), prompt=config, name="raw")
    tcs = {
        m: transcoders.Transcoder(
            transcoders.TranscoderConfig(d_in=32, d_out=32, n_features=48, k=6, activation="topk", layer=m)
        )
        for m in range(2)
    }
    with torch.no_grad():
        for tc in tcs.values():
            tc.W_enc.mul_(5.0)
            tc.W_dec.mul_(5.0)
    tset = transcoders.TranscoderSet(tcs, n_layers_model=2)
    prompts = models.tokenize_prompts(tok, model.build_prompts(texts[:4]))
    traced = circuits.trace_prompts(model, tset, prompts, [labels[0], labels[1]] * 2, ["a", "b", "a", "b"],
                                    progress=False)
    assert list(traced.cells["group"]) == ["a", "b", "a", "b"], traced.cells
    assert set(traced.nodes["group"]) == {"a", "b"} and (traced.nodes["kind"] == "target").sum() == 2
    # each prompt's target value is the model's own logit difference at the label's distinguishing token
    ids = models.label_token_ids(tok, config, labels)
    for prompt, label, value in zip(prompts, [0, 1, 0, 1], traced.cells["target_value"]):
        lt = circuits.label_target(ids, label)
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([prompt.input_ids + lt.prefix])).logits[0, -1]
        expected = float(logits[lt.token] - logits[list(lt.competitors)].mean())
        assert abs(value - expected) < 1e-3 + 1e-3 * abs(expected), (value, expected)
    validation = circuits.validate_prompts(model, tset, prompts, traced.cells, traced.nodes, n_random=2,
                                           progress=False)
    assert list(validation["group"]) == ["a", "b"]
    quality = transcoders.evaluate(model, tset, prompts, labels, progress=False)
    assert list(quality["layer"]) == [0, 1, "all"]
    assert "anndata" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
    print("ok")
    """
)


def test_trace_on_raw_prompts_without_anndata_or_scanpy():
    result = subprocess.run(
        [sys.executable, "-c", RAW_PROMPT_TRACE], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok")


def facts() -> str:
    """Module count per layer, back-edges, cycles and the largest module: the numbers quoted about the layering."""
    graph = import_graph()
    mods = modules()
    per_part = Counter(part(m) or "(root)" for m in mods)
    lines = [f"{p:12s} layer {LAYERS['' if p == '(root)' else p]}  {n} modules" for p, n in sorted(per_part.items())]
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in mods.items()), reverse=True)
    lines.append(f"{len(mods)} modules, {graph.number_of_edges()} import edges")
    lines.append(
        f"back-edges: {len(back_edges(graph))}; module cycles: {len(list(nx.simple_cycles(graph)))}; "
        f"package cycles: {len(package_cycles(graph))}"
    )
    lines.append("largest modules: " + ", ".join(f"{m} ({n})" for n, m in sizes[:5]))
    return "\n".join(lines)


if __name__ == "__main__":
    print(facts())
