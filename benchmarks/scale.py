"""Throughput at the scale of a real checkpoint: prediction, a bare forward pass and activation collection.

A randomly initialised GPT-NeoX of C2S-Pythia-410m's shape (24 layers, d_model 1024, 16 heads, MLP 4096, vocabulary
50304) reads 200-gene prompts built from the genes of ``cc.ds.pbmc68k()`` with the tokenizer shipped in
``pbmc68k-tiny`` (no download; its prompts are shorter than C2S's own, so the mean prompt length is printed). The
table gives, for the current code:

- prediction (``cc.tl.predict_cell_types`` over the shipped model's 10 labels) in float32 and bfloat16, cells/s;
- a bare forward pass of the transformer (no unembedding, the same prompts and batch size), tokens/s and cells/s;
- activation collection (``cellcircuits.transcoders.collect_activations``, every layer, float16 store) tokens/s;
- the ratios collection / bare forward, predict bfloat16 / float32 and predict / bare forward;
- peak memory: the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` per row on CUDA;
- circuit tracing (``cellcircuits.circuits.trace_prompts``, one cell traced to a label, in float32) with random TopK
  transcoders on every layer (width 16384, k 64; ``--tiny``: 1024, k 16): seconds per cell and peak memory at each
  number of feature nodes (``--trace-nodes``, default 128 1024 8192; ``--tiny``: 128 1024) and prompt length
  (``--trace-genes``, default 100 200 400; ``--tiny``: 100 200).

It runs on CUDA when available. ``--tiny`` uses a small shape that runs on a CPU in a few minutes.

    python benchmarks/scale.py --tiny
    python benchmarks/scale.py --cells 512 --max-batch-tokens 16384
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import torch

import cellcircuits as cc
from cellcircuits.models import C2SModel, ModelAdapter, tokenize_prompts
from cellcircuits.models._scoring import pad
from cellcircuits.pp import PromptConfig
from cellcircuits.transcoders import Transcoder, TranscoderConfig, TranscoderSet, collect_activations

#: Shapes: C2S-Pythia-410m's, and a small one for CPUs and CI.
SHAPES = {
    "410m": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
    "tiny": {"num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512},
}


@dataclass
class Context:
    """What every row measures on: the model, the cells, the device and the settings."""

    model: C2SModel
    adata: ad.AnnData
    device: torch.device
    batch_size: int
    max_batch_tokens: int
    repeats: int = 1
    prompt_tokens: list[int] = field(default_factory=list)


@dataclass
class Row:
    """One line of the table."""

    name: str
    dtype: str
    value: float
    unit: str
    peak_mib: float | None = None


def build(shape: str, n_cells: int, n_genes: int, device: torch.device, seed: int = 0) -> tuple[C2SModel, ad.AnnData]:
    """The random GPT-NeoX of ``shape`` with the shipped tokenizer and labels, and ``n_cells`` random cells."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    shipped = cc.models.shipped_model_path("pbmc68k-tiny")
    tokenizer = AutoTokenizer.from_pretrained(shipped)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    labels = cc.models.load("pbmc68k-tiny", device="cpu").labels
    vocab = 50304 if shape == "410m" else len(tokenizer)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        **SHAPES[shape], vocab_size=vocab, max_position_embeddings=4096, rotary_pct=0.25, attn_implementation="sdpa"
    )
    net = GPTNeoXForCausalLM(config).eval().to(device)
    prompt = PromptConfig(n_genes=n_genes, labels=labels, append_eos=True)
    model = C2SModel(model=net, tokenizer=tokenizer, adapter=ModelAdapter(net), prompt=prompt, name=f"random-{shape}")
    genes = np.asarray(cc.ds.pbmc68k().var_names, dtype=object)
    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.permutation(genes)[:n_genes]) for _ in range(n_cells)]
    adata = ad.AnnData(
        np.zeros((n_cells, 1), dtype=np.float32),
        obs=pd.DataFrame({"cell_sentence": sentences}, index=[f"c{i}" for i in range(n_cells)]),
    )
    return model, adata


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(ctx: Context, fn: Callable[[], object]) -> tuple[float, float]:
    """Seconds ``fn`` takes (the fastest of ``ctx.repeats`` runs, each synchronised) and the peak memory in MiB."""
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    runs = []
    for _ in range(max(1, ctx.repeats)):
        _sync(ctx.device)
        start = time.perf_counter()
        fn()
        _sync(ctx.device)
        runs.append(time.perf_counter() - start)
    seconds = min(runs)
    if ctx.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**20
    else:  # ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return seconds, peak


def predict_row(ctx: Context, dtype: torch.dtype) -> Row:
    """Prediction over every candidate label, cells/s."""
    ctx.model.model.to(dtype)
    small = ctx.adata[:4].copy()
    cc.tl.predict_cell_types(small, ctx.model, progress=False)  # warm-up
    seconds, peak = measure(
        ctx,
        lambda: cc.tl.predict_cell_types(
            ctx.adata, ctx.model, batch_size=None, max_batch_tokens=ctx.max_batch_tokens, progress=False
        ),
    )
    return Row("predict_cell_types", str(dtype).removeprefix("torch."), ctx.adata.n_obs / seconds, "cells/s", peak)


@torch.no_grad()
def forward_row(ctx: Context, dtype: torch.dtype) -> Row:
    """The transformer alone over the prompts (right padded, sorted by length, ``batch_size`` at a time)."""
    ctx.model.model.to(dtype)
    order = np.argsort(ctx.prompt_tokens)
    prompts = ctx.model.tokenizer([p.text for p in ctx.model.build_prompts(ctx.adata.obs["cell_sentence"])])
    ids = [prompts["input_ids"][i] for i in order]
    batches = [
        pad(ids[b : b + ctx.batch_size], ctx.model.tokenizer.pad_token_id, "right")
        for b in range(0, len(ids), ctx.batch_size)
    ]
    base = ctx.model.model.base_model
    base(input_ids=batches[0][0][:2].to(ctx.device), attention_mask=batches[0][1][:2].to(ctx.device))  # warm-up

    def run() -> None:
        for x, m in batches:
            base(input_ids=x.to(ctx.device), attention_mask=m.to(ctx.device), use_cache=False)

    seconds, peak = measure(ctx, run)
    return Row("bare forward", str(dtype).removeprefix("torch."), sum(ctx.prompt_tokens) / seconds, "tokens/s", peak)


def collect_row(ctx: Context, dtype: torch.dtype) -> Row:
    """Collection of every layer's MLP input and output at the genes and answer positions, tokens/s (of prompts)."""
    ctx.model.model.to(dtype)
    prompts = tokenize_prompts(ctx.model.tokenizer, ctx.model.build_prompts(ctx.adata.obs["cell_sentence"]))
    with tempfile.TemporaryDirectory() as tmp:
        collect_activations(ctx.model, prompts[:2], f"{tmp}/warm-up", progress=False)
        runs = iter(range(max(1, ctx.repeats)))  # a fresh store each run: a finished one is returned as it is

        def run() -> None:
            where = f"{tmp}/run{next(runs)}"
            collect_activations(ctx.model, prompts, where, batch_size=ctx.batch_size, progress=False)
            shutil.rmtree(where)

        seconds, peak = measure(ctx, run)
    return Row(
        "collect_activations", str(dtype).removeprefix("torch."), sum(ctx.prompt_tokens) / seconds, "tokens/s", peak
    )


def random_transcoders(model: C2SModel, n_features: int, k: int, seed: int = 0) -> TranscoderSet:
    """Random TopK transcoders on every layer of ``model``, their features sized to matter next to the MLPs."""
    torch.manual_seed(seed)
    d, n_layers = model.adapter.d_model, model.adapter.n_layers
    tcs = {}
    for layer in range(n_layers):
        tc = Transcoder(TranscoderConfig(d_in=d, d_out=d, n_features=n_features, k=k, layer=layer))
        with torch.no_grad():
            tc.W_dec.mul_(5.0)
        tcs[layer] = tc.to(model.device)
    return TranscoderSet(tcs, n_layers_model=n_layers)


def trace_table(ctx: Context, nodes: list[int], genes: list[int], n_features: int, k: int) -> Iterator[str]:
    """Seconds per cell and peak memory of tracing one cell, per number of feature nodes and prompt length.

    Traces at the library's defaults (``batch_size`` included); each row is given as soon as it is measured.
    """
    ctx.model.model.to(torch.float32)
    tset = random_transcoders(ctx.model, n_features, k)
    names = np.asarray(cc.ds.pbmc68k().var_names, dtype=object)
    rng = np.random.default_rng(1)
    label = (ctx.model.labels or [""])[0]
    kept = ctx.model.prompt.n_genes
    prompts = {}
    try:
        for g in genes:
            ctx.model.prompt.n_genes = g
            sentence = " ".join(rng.permutation(names)[:g])
            (prompts[g],) = tokenize_prompts(ctx.model.tokenizer, ctx.model.build_prompts([sentence]))
        # graph size outside, prompt length inside: the smaller graphs of every length come before the largest
        for n in nodes:
            for g, prompt in prompts.items():

                def run(prompt=prompt, n=n) -> None:
                    cc.circuits.trace_prompts(ctx.model, tset, [prompt], [label], max_feature_nodes=n, progress=False)

                repeats, ctx.repeats = ctx.repeats, 1
                try:
                    seconds, peak = measure(ctx, run)
                except (MemoryError, torch.cuda.OutOfMemoryError) as error:  # a row that does not fit: say so, go on
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    reason = str(error).split(";")[0][:150]
                    yield f"| {n:>13} | {g:>5} | {len(prompt.input_ids):>13} | out of memory: {reason} |"
                    continue
                finally:
                    ctx.repeats = repeats
                yield f"| {n:>13} | {g:>5} | {len(prompt.input_ids):>13} | {seconds:>7.1f} | {peak:>10.0f} |"
    finally:
        ctx.model.prompt.n_genes = kept


def extra_rows(ctx: Context) -> list[Row]:
    """Rows added by other benchmarks at this scale: training against sparsify, and tracing. None yet.

    Add here functions of ``ctx`` returning :class:`Row`; their rows are printed in the same table.
    """
    return []


def main(argv: list[str] | None = None) -> None:
    """Build the model and cells, measure every row, print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small shape that runs on a CPU in a minute or two")
    parser.add_argument("--cells", type=int, default=None, help="cells (default 64 with --tiny, else 256)")
    parser.add_argument("--genes", type=int, default=200, help="genes per prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="cells per batch of the forward and collection")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="token budget of a prediction batch")
    parser.add_argument("--device", default=None, help="default CUDA when available, else CPU")
    parser.add_argument("--repeats", type=int, default=1, help="time each row this often, keep the fastest")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--trace-nodes", type=int, nargs="*", help="feature nodes of the tracing rows (none: skip)")
    parser.add_argument("--trace-genes", type=int, nargs="+", help="genes per prompt of the tracing rows")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = "tiny" if args.tiny else "410m"
    n_cells = args.cells or (64 if args.tiny else 256)
    model, adata = build(shape, n_cells, args.genes, device)
    ctx = Context(model, adata, device, args.batch_size, args.max_batch_tokens, args.repeats)
    ctx.prompt_tokens = [
        len(p) for p in model.tokenizer([p.text for p in model.build_prompts(adata.obs["cell_sentence"])])["input_ids"]
    ]
    n_params = sum(p.numel() for p in model.model.parameters())
    print(
        f"# {shape}: {n_params / 1e6:.1f}M parameters, {model.adapter.n_layers} layers, "
        f"d_model {model.adapter.d_model}; {n_cells} cells of {args.genes} genes, "
        f"{np.mean(ctx.prompt_tokens):.0f} prompt tokens on average; {len(model.labels or [])} labels; "
        f"device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    low = torch.bfloat16
    run_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [
        predict_row(ctx, torch.float32),
        predict_row(ctx, low),
        forward_row(ctx, torch.float32),
        forward_row(ctx, low),
        collect_row(ctx, run_dtype),
        *extra_rows(ctx),
    ]
    mem = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"\n| {'measure':<22} | {'dtype':<8} | {'value':>12} | {'unit':<9} | {mem:>12} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 14}|{'-' * 11}|{'-' * 14}|")
    for r in rows:
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else ""
        print(f"| {r.name:<22} | {r.dtype:<8} | {r.value:>12.1f} | {r.unit:<9} | {peak:>12} |")
    by = {(r.name, r.dtype): r.value for r in rows}
    mean_tokens = float(np.mean(ctx.prompt_tokens))
    name = str(run_dtype).removeprefix("torch.")
    ratios = {
        f"collection / bare forward ({name})": by["collect_activations", name] / by["bare forward", name],
        "predict bfloat16 / float32": by["predict_cell_types", "bfloat16"] / by["predict_cell_types", "float32"],
        "predict / bare forward (float32, cells/s)": by["predict_cell_types", "float32"]
        / (by["bare forward", "float32"] / mean_tokens),
        "predict / bare forward (bfloat16, cells/s)": by["predict_cell_types", "bfloat16"]
        / (by["bare forward", "bfloat16"] / mean_tokens),
    }
    print()
    for k, v in ratios.items():
        print(f"{k:<44} {v:.2f}x")
    nodes = args.trace_nodes if args.trace_nodes is not None else ([128, 1024] if args.tiny else [128, 1024, 8192])
    if nodes:
        genes = args.trace_genes or ([100, 200] if args.tiny else [100, 200, 400])
        width, k = (1024, 16) if args.tiny else (16384, 64)
        print(f"\ntracing one cell, random TopK transcoders on every layer (width {width}, k {k}), float32:")
        print(f"| feature nodes | genes | prompt tokens |  s/cell | {mem[:-4]} MiB |")
        print(f"|{'-' * 15}|{'-' * 7}|{'-' * 15}|{'-' * 9}|{'-' * 12}|")
        for line in trace_table(ctx, nodes, genes, width, k):
            print(line, flush=True)


if __name__ == "__main__":
    main()
