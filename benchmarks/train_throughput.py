"""Training throughput of a TopK transcoder, cellcircuits against EleutherAI's sparsify, on the same activations.

Both train a TopK transcoder of the same width and ``k`` on the same batches, in the same order, of one layer's
MLP activations, and both are evaluated on held-out activations. ``--model pbmc68k-tiny`` (the default): the shipped
model on the ``train`` cells of ``cc.ds.pbmc68k()``, held out its 142 ``test`` cells. ``--model 410m`` or ``tiny``:
``benchmarks/scale.py``'s random GPT-NeoX of C2S-Pythia-410m's shape (or its small one) on ``--cells`` random
200-gene cells, the last fifth held out (for the issue's 410m comparison: ``--model 410m --width 16384 --k 64`` on a
GPU). The batches are read from the store once and moved to ``--device`` before any timing, so only training is
timed:

- cellcircuits: ``cellcircuits.transcoders.train_on_store`` itself (its Adam, warm-up and decay, dead-feature
  tracking and auxiliary loss, the defaults of ``cc.tl.train_transcoders``), fed from the preloaded batches;
- sparsify: its ``SparseCoder`` in transcode mode, stepped the way its ``Trainer`` steps it with ``loss_fn="fvu"``
  and its other defaults: encoder and decoder biases set from the first batch's means, loss ``fvu`` (``auxk_alpha``
  is 0, so no AuxK), its default optimizer (sign SGD under schedule-free momentum 0.95, lr
  ``5e-3 / sqrt(num_latents / 2**14)``, no schedule) switched to its averaged weights (``eval()``) before
  evaluation as its ``Trainer`` does before saving, and the fired-latent counts it keeps. In transcode mode its
  trainer neither renormalises the decoder nor projects out the gradient parallel to decoder rows, so neither does
  this. No model, tokenizer or dataset plumbing runs.

Throughput is also given as GFLOP/s, from a FLOP count per step that is the same for both (printed), and as a
fraction of a dense ``torch.mm`` of the encoder's size timed in the same run.

    pip install -e ".[bench]"
Each trainer runs ``--repeats`` times, the two taking turns, and keeps its best time (another process on the machine
slows single runs at random); held-out figures are those of the last run (both trainers are deterministic).

    python benchmarks/train_throughput.py [--store DIR] [--layer 3] [--tokens 500000] [--threads 2] [--repeats 3]
    python benchmarks/train_throughput.py --model 410m --layer 12 --width 16384 --k 64 --device cuda --cells 320
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time
from pathlib import Path

import torch

import cellcircuits as cc
from cellcircuits.transcoders import ActivationStore, TranscoderConfig
from cellcircuits.transcoders._loop import resolve_matmul_dtype
from cellcircuits.transcoders._store import MANIFEST, tensor_names
from cellcircuits.transcoders._training import train_on_store


def open_or_collect(directory: Path, split: str, args) -> ActivationStore:
    if (directory / MANIFEST).is_file():
        store = ActivationStore(directory)
        if store.manifest.complete:
            return store
    if args.model == "pbmc68k-tiny":
        adata = cc.ds.pbmc68k()
        cells = adata[adata.obs["split"] == split].copy()
        model = cc.models.load("pbmc68k-tiny", device=args.device)
        return cc.tl.collect_activations(cells, model, directory, progress=False)
    from scale import build  # benchmarks/scale.py: the random model of a real checkpoint's shape

    model, adata = build(args.model, args.cells, 200, torch.device(args.device), seed=args.seed)
    n_test = max(1, args.cells // 5)
    cells = adata[: args.cells - n_test] if split == "train" else adata[args.cells - n_test :]
    return cc.tl.collect_activations(cells.copy(), model, directory, layers=[args.layer], progress=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PreloadedStore:
    """Serves batches read once from a store, so that training is timed without any store I/O.

    ``iter_batches`` gives, per epoch, exactly the batches the store gave for it when loaded (same rows, same order).
    """

    def __init__(
        self, store: ActivationStore, layer: int, batch_size: int, n_steps: int, seed: int, device: torch.device
    ) -> None:
        self.directory = store.directory
        self.manifest = store.manifest
        self.n_rows = store.n_rows
        self.n_cells = store.n_cells
        self.layers = [layer]
        self.batch_size = batch_size
        self.seed = seed
        self.epochs: list[list[dict[str, torch.Tensor]]] = []
        n_batches = 0
        while n_batches < n_steps:
            epoch = list(store.iter_batches(batch_size, [layer], seed=seed, epoch=len(self.epochs), drop_last=True))
            epoch = [{k: v.to(device) for k, v in b.items()} for b in epoch[: n_steps - n_batches]]
            self.epochs.append(epoch)
            n_batches += len(self.epochs[-1])
        sample = store.sample(min(16384, store.n_rows), [layer], seed=seed)
        self._sample = {k: v.to(device) for k, v in sample.items()}

    def batches(self) -> list[dict[str, torch.Tensor]]:
        return [batch for epoch in self.epochs for batch in epoch]

    def sample(self, n_rows: int, layers=None, seed: int = 0) -> dict[str, torch.Tensor]:
        if (n_rows, seed) != (min(16384, self.n_rows), self.seed):
            raise ValueError("only the sample train_on_store draws was preloaded")
        return self._sample

    def iter_batches(self, batch_size: int, layers=None, *, seed: int = 0, epoch: int = 0, **kw):
        if (batch_size, seed) != (self.batch_size, self.seed) or epoch >= len(self.epochs):
            raise ValueError("only the batches train_on_store reads were preloaded")
        yield from self.epochs[epoch]


def train_cellcircuits(store: PreloadedStore, d: int, args) -> tuple[torch.nn.Module, float]:
    config = TranscoderConfig(
        d_in=d,
        d_out=d,
        n_features=args.width,
        activation="topk",
        k=args.k,
        dead_after_tokens=200_000,  # cc.tl.train_transcoders' default
        dtype="float32",
    )
    start = time.perf_counter()
    tset = train_on_store(
        store,
        config,
        layers=[args.layer],
        n_layers_model=store.manifest.layers[-1] + 1,
        n_tokens=args.tokens,
        batch_size=args.batch_size,
        lr=2e-3,  # cc.tl.train_transcoders' default
        seed=args.seed,
        device=args.device,
        matmul_dtype=None if args.matmul_dtype == "auto" else args.matmul_dtype,
        progress=False,
    )
    _sync(torch.device(args.device))
    return tset[args.layer], time.perf_counter() - start


def train_sparsify(batches: list[dict[str, torch.Tensor]], d: int, args):
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    n_in, n_out = tensor_names(args.layer)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cfg = SparseCoderConfig(num_latents=args.width, k=args.k, transcode=True)
    coder = SparseCoder(d, cfg, device=device, dtype=torch.float32)
    lr = 5e-3 / (coder.num_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": coder.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(coder.num_latents, dtype=torch.long, device=device)
    did_fire = torch.zeros(coder.num_latents, dtype=torch.bool, device=device)
    avg_fvu = 0.0
    for step, batch in enumerate(batches):
        x, y = batch[n_in], batch[n_out]
        if step == 0:
            with torch.no_grad():
                coder.encoder.bias.data = -x.mean(0) @ coder.encoder.weight.data.T
                coder.b_dec.data = y.mean(0)
        total_variance = (y - y.mean(0)).pow(2).sum()
        out = coder(x=x, y=y, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        avg_fvu += float(out.fvu.detach())
        out.fvu.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired += len(x)
            since_fired[did_fire] = 0
            did_fire.zero_()
    opt.eval()
    _sync(device)
    return coder, time.perf_counter() - start


@torch.no_grad()
def held_out(predict, x: torch.Tensor, y: torch.Tensor, n_features: int) -> tuple[float, float, float]:
    """FVU over all held-out rows, mean L0 and the fraction of features that never fire on them."""
    sq_err, l0, fired = 0.0, 0.0, torch.zeros(n_features, dtype=torch.bool, device=x.device)
    for xs, ys in zip(x.split(8192), y.split(8192), strict=True):
        y_hat, features = predict(xs)
        sq_err += float((ys - y_hat).pow(2).sum())
        l0 += float((features != 0).sum())
        fired |= (features != 0).any(0)
    return sq_err / float((y - y.mean(0)).pow(2).sum()), l0 / len(x), 1 - float(fired.float().mean())


def dense_gflops(rows: int, d: int, width: int, device: torch.device, repeats: int = 200) -> float:
    a, w = torch.randn(rows, d, device=device), torch.randn(d, width, device=device)
    for _ in range(10):
        torch.mm(a, w)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, w)
    _sync(device)
    return 2 * rows * d * width * repeats / (time.perf_counter() - start) / 1e9


def peak_rss_mib(device: torch.device) -> float:
    """The process's peak RSS on a CPU; the device's peak allocated memory on CUDA (reset by each call)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="directory of the activation stores (train/, test/); made when missing")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024, help="features (num_latents)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer, taking turns; best time kept")
    parser.add_argument(
        "--matmul-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="dtype of cellcircuits' feature-choosing encoder product (train_transcoders' matmul_dtype; auto: "
        "bfloat16 on a GPU, float32 on a CPU)",
    )
    parser.add_argument("--model", choices=["pbmc68k-tiny", "410m", "tiny"], default="pbmc68k-tiny")
    parser.add_argument("--cells", type=int, default=320, help="random cells with --model 410m or tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="cellcircuits-bench-") as tmp:
        root = (Path(args.store) if args.store else Path(tmp)) / ("" if args.model == "pbmc68k-tiny" else args.model)
        train_store = open_or_collect(root / "train", "train", args)
        test_store = open_or_collect(root / "test", "test", args)
        if args.layer not in train_store.layers:
            parser.error(f"--layer {args.layer} is not in the store (layers {train_store.layers})")
        n_steps = max(1, math.ceil(args.tokens / args.batch_size))
        preloaded = PreloadedStore(train_store, args.layer, args.batch_size, n_steps, args.seed, device)
        # read everything the runs need while a temporary store still exists
        warm_store = PreloadedStore(train_store, args.layer, args.batch_size, 8, args.seed, device)
        n_in, n_out = tensor_names(args.layer)
        test = [test_store.load_shard(i) for i in range(len(test_store.manifest.shards))]
    batches = preloaded.batches()
    x_test = torch.cat([s[n_in] for s in test]).float().to(device)
    y_test = torch.cat([s[n_out] for s in test]).float().to(device)
    d = train_store.manifest.d_model
    B, F, k = args.batch_size, args.width, args.k
    tokens = n_steps * B

    # a short untimed warm-up of both code paths
    warm = argparse.Namespace(**{**vars(args), "tokens": 8 * B})
    train_cellcircuits(warm_store, d, warm)
    train_sparsify(batches[:8], d, warm)

    dense = [dense_gflops(B, d, F, device)]
    rows = {}
    # the two trainers take turns, and each keeps its best time: a machine shared with other work slows
    # single runs at random
    for _ in range(args.repeats):
        for name in ("cellcircuits", "sparsify"):
            rss = peak_rss_mib(device)
            if name == "cellcircuits":
                tc, seconds = train_cellcircuits(preloaded, d, args)

                def predict(xs, tc=tc):
                    out = tc(xs)
                    return out.output, out.features

                optimizer = "Adam, warm-up + decay"
            else:
                coder, seconds = train_sparsify(batches, d, args)

                def predict(xs, coder=coder):
                    acts, indices, _ = coder.encode(xs)
                    features = torch.zeros(len(xs), coder.num_latents, device=xs.device).scatter_(-1, indices, acts)
                    return coder.decode(acts, indices), features

                optimizer = "schedule-free signSGD"
            if name in rows:
                seconds = min(seconds, rows[name][1])
            rows[name] = (
                optimizer,
                seconds,
                *held_out(predict, x_test, y_test, F),
                peak_rss_mib(device) - (0 if device.type == "cuda" else rss),
            )
            dense.append(dense_gflops(B, d, F, device))
    dense_ref = max(dense)

    flops_step = 4 * B * d * F + 6 * B * k * d
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    chosen = resolve_matmul_dtype(None if args.matmul_dtype == "auto" else args.matmul_dtype, device)
    print(
        f"TopK transcoder, layer {args.layer} of {train_store.manifest.model_name}: d={d}, width={F}, k={k}, "
        f"batch={B}, "
        f"{n_steps} steps = {tokens} tokens on {train_store.n_rows} train rows (preloaded), best of {args.repeats} "
        "runs each, "
        f"held out: {len(x_test)} rows of {test_store.manifest.n_cells_done} test cells; "
        f"{where}, torch {torch.__version__}; cellcircuits chooses features with a {chosen} product"
    )
    print(
        f"FLOPs per step (same count for both): 4*B*d*F + 6*B*k*d = {flops_step / 1e6:.0f} M "
        "(encoder 2BdF forward + 2BdF weight gradient, the input needs none; decoder 2Bkd forward + 4Bkd backward; "
        "top-k selection and element-wise work not counted)"
    )
    print(f"dense torch.mm ({B} x {d}) @ ({d} x {F}): {dense_ref:.1f} GFLOP/s (best of {len(dense)} timings)\n")
    header = (
        f"{'':<13}{'optimizer':<23}{'train s':>8}{'tokens/s':>10}{'GFLOP/s':>9}{'of dense':>9}"
        f"{'FVU (held out)':>16}{'L0':>6}{'dead':>7}{'peak RSS +MiB':>15}"
    )
    print(header)
    for name, (optimizer, seconds, fvu, l0, dead, rss) in rows.items():
        gflops = flops_step * n_steps / seconds / 1e9
        print(
            f"{name:<13}{optimizer:<23}{seconds:8.2f}{tokens / seconds:10.0f}{gflops:9.1f}{gflops / dense_ref:9.1%}"
            f"{fvu:16.4f}{l0:6.1f}{dead:7.1%}{rss:15.0f}"
        )
    ratio = rows["sparsify"][1] / rows["cellcircuits"][1]
    fvu_cc, fvu_sp = rows["cellcircuits"][2], rows["sparsify"][2]
    print(f"\ntokens/s cellcircuits / sparsify: {ratio:.2f}x")
    verdict = "faster" if ratio > 1 else "not faster"
    quality = "equal or better" if fvu_cc <= fvu_sp else "worse"
    print(f"cellcircuits is {verdict} than sparsify, at {quality} held-out FVU ({fvu_cc:.4f} vs {fvu_sp:.4f})")
    print(
        "train s: cellcircuits includes train_on_store's setup (init, scales from a preloaded sample, "
        "folding scales); peak RSS +MiB: growth of this process's peak RSS during the run (0 if an earlier "
        "phase already peaked higher); on CUDA, the run's peak allocated GPU memory instead"
    )


if __name__ == "__main__":
    main()
