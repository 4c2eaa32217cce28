# %% [markdown]
# # Features and circuits of a cell-type call
#
# Tutorial 01 used the shipped `pbmc68k-tiny` model as a black box. This one opens it: it trains *transcoders*
# (wide, sparse stand-ins for the model's MLPs) on its activations, puts their features into AnnData next to the
# usual scanpy results, names them by gene-set enrichment, and traces the circuit by which the model calls a cell
# "CD14+ Monocyte": which genes of the cell sentence, through which features, push the answer. Everything runs
# offline on the embedded data in about two minutes on 2 CPU cores. (Open it as a notebook with
# `jupytext --to notebook 02_features_and_circuits.py`, or run it as a script.)

# %%
import sys
import tempfile
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # run as a script: draw figures without a display
    matplotlib.use("Agg")

import anndata as ad
import networkx as nx
import pandas as pd
import scanpy as sc

import cellcircuits as cc

pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 20)
pd.set_option("display.max_colwidth", 48)

adata = cc.ds.pbmc68k()
model = cc.models.load("pbmc68k-tiny", device="cpu")
train = adata[adata.obs["split"] == "train"].copy()
test = adata[adata.obs["split"] == "test"].copy()
print(f"{train.n_obs} train cells, {test.n_obs} held-out cells, {model.adapter.n_layers} MLP layers")

# %% [markdown]
# ## Transcoders
#
# `train_transcoders` runs the training cells through the model, records each MLP's input and output at the gene
# tokens, the end of the prompt and the tokens of an appended label, and trains one TopK transcoder per layer
# (1024 features, 32 active per token) to map the one to the other. The default `n_tokens=4_000_000` gives the
# figures in the README; `300_000` keeps this tutorial quick (about a minute) at a somewhat higher FVU and more
# dead features.

# %%
tset = cc.tl.train_transcoders(train, model, n_tokens=300_000)
tset

# %% [markdown]
# `evaluate_transcoders` checks them on held-out cells (50 of the 142 here, to save time; leave out `n_cells`
# for all): `fvu` is the fraction of the MLP output's variance they miss, `l0` the active features per token,
# `loss_recovered` how much of the next-gene loss lost by zeroing the MLP comes back when the transcoder stands in
# for it (1 = all), and `agreement` the share of cells whose predicted cell type is unchanged. The `all` row
# splices every layer in at once, which is what circuits use.

# %%
quality = cc.tl.evaluate_transcoders(test, model, tset, label_key="bulk_labels", n_cells=50)
spliced = quality.set_index("layer").loc["all"]
print(
    f"all layers spliced in: FVU {spliced['fvu']:.3f}, loss recovered {spliced['loss_recovered']:.3f}, "
    f"agreement {spliced['agreement']:.3f}, accuracy {spliced['accuracy_spliced']:.3f} "
    f"(original model {spliced['accuracy_original']:.3f})"
)
quality[["layer", "fvu", "l0", "dead_fraction", "loss_recovered", "accuracy_spliced", "agreement"]]

# %% [markdown]
# ## Features in AnnData
#
# `transcode` runs all 700 cells and stores, per layer `L`, each cell's feature activations (max over its gene
# tokens) in `.obsm["X_transcoder_L{L}"]`, and two gene maps in `.varm`: `_in` (how strongly each gene's tokens
# switch the feature on) and `_out` (how much the feature promotes the gene's tokens). Genes the model never saw
# in a sentence are reported in a warning.

# %%
cc.tl.transcode(adata, model, tset)
print(adata.obsm["X_transcoder_L3"].shape, adata.varm["transcoder_L3_in"].shape)

# %% [markdown]
# Features are ranked per cell type like genes with `sc.tl.rank_genes_groups` (same layout); `method="auroc"`
# scores each feature by how well its activation tells the group from the other cells (1 = perfectly).

# %%
cc.tl.rank_features_groups(adata, "bulk_labels", layers=3, method="auroc")
mono_ranking = cc.get.rank_features_groups_df(adata, "CD14+ Monocyte")
top_feature = int(mono_ranking["feature"].iloc[0])
b_feature = int(cc.get.rank_features_groups_df(adata, "CD19+ B")["feature"].iloc[0])
print(f"top CD14+ Monocyte feature of layer 3: {top_feature} (AUROC {mono_ranking['score'].iloc[0]:.3f})")
mono_ranking.head()

# %% [markdown]
# On the UMAP of `pbmc68k_reduced`, the top CD14+ Monocyte feature (and, for contrast, the top CD19+ B feature)
# light up their cell types; panel titles list each feature's top input genes.

# %%
sc.pl.umap(adata, color="bulk_labels", show=False)
cc.pl.feature_embedding(adata, [top_feature, b_feature], layers=3, show=False)

# %% [markdown]
# What the feature reads (left: genes whose tokens activate it) and writes (right: genes whose tokens it promotes
# as the next word of the sentence):

# %%
cc.pl.feature_genes(adata, top_feature, layers=3, show=False)

# %% [markdown]
# ## Naming features automatically
#
# `interpret_features` tests each live feature's 50 top input genes for over-representation (ORA) in the shipped
# gene sets: cell-type markers from published lists, plus GO Biological Process and WikiPathways when the optional
# `pyenrichr` package is installed (`pip install 'cellcircuits[pathways]'`). A feature's label is its best term
# when FDR < 0.05, else its top genes; it also gets the cell type where it is most active, with an AUROC, and flags.
# The summary gives, per layer, the fraction of features that are significantly enriched.

# %%
cc.tl.interpret_features(adata, groupby="bulk_labels")
summary = adata.uns["interpret_features"]["summary"]
features = adata.uns["interpret_features"]["features"]
for row in summary.itertuples():
    print(
        f"layer {row.layer}: {row.n_live_features} live features, {row.fraction_enriched_live:.0%} enriched, "
        f"{row.fraction_enriched_top20:.0%} of the 20 most active"
    )
summary

# %% [markdown]
# The enriched features that best mark one cell type. Labels are leads, not verdicts: a term names the input
# genes, which can differ from the cell type the feature marks, and `spelling_share` flags features whose top genes
# share a piece of spelling (gene families, or the model reading tokens rather than biology).

# %%
columns = ["layer", "feature", "label", "cell_type", "cell_type_auroc", "top_input_genes", "spelling_share"]
print(features.query("layer == 3 and feature == @top_feature")[columns].to_string(index=False))
features[features["enriched"]].nlargest(6, "cell_type_auroc")[columns]

# %% [markdown]
# The enrichment of one layer as a dot plot (terms x features, the features with the most significant terms).
# The plot needs a significant term, so take the layer with the most enriched features.

# %%
enriched_layer = int(summary.loc[summary["n_enriched_live"].idxmax(), "layer"])
enrichment_key = f"transcoder_L{enriched_layer}_in_enrichment"
print(f"layer {enriched_layer}: {int(summary['n_enriched_live'].max())} enriched features")
cc.pl.enrichment(adata, enrichment_key, show=False)

# %% [markdown]
# ## Circuits
#
# `trace_circuit` replaces every MLP by its transcoder plus an error node (what the transcoder misses), freezes
# attention patterns and layer norms, and splits the model's preference for the right label (its logit against
# the other labels, at the first token where they differ) exactly into contributions of gene tokens, features at
# each position and error nodes. The strongest nodes and edges are kept, named by gene, and averaged over the
# cells of each group. Two cells per group keep this quick; use more (the default is 20) for real work.

# %%
cc.tl.trace_circuit(adata, model, tset, groupby="bulk_labels", groups=["CD14+ Monocyte", "CD19+ B"], n_cells=2)
circuits = adata.uns["circuits"]["bulk_labels"]
circuits["cells"]

# %% [markdown]
# `validate_circuit` tests each circuit by intervening on its features, with everything downstream recomputed:
#
# - `faithfulness`: keep only the circuit's features (every other feature zeroed) and compare the target with all
#   features and with none: `(circuit only - none) / (all - none)`. Near 1, the circuit alone carries the call.
# - `zero_drop`, `mean_drop`: drop of the target (a logit difference) when the circuit's features are set to zero
#   or to their mean, against `random_zero_drop`/`random_mean_drop` for as many random active features. The
#   circuit also keeps features that push *against* the label; `support_drop` ablates only those that push for it.
#   `zero_prob_drop` is the drop of the label's probability.
# - `clamp_shift` vs `clamp_shift_predicted`: the strongest feature (`clamp_feature`) is doubled; the measured
#   shift of the target is set beside the graph's prediction. The graph is linear, with attention and norms
#   frozen; the gap between the two is what that picture misses for this feature.
# - `replacement_score`, `completeness_score`: how much of the influence on the target starts at tokens rather
#   than error nodes, and how much of the nodes' input comes from non-error nodes; 1 means the transcoders explain
#   everything (`*_pruned`: the same for the pruned graph).

# %%
validation = cc.tl.validate_circuit(adata, model, tset, "bulk_labels")
for row in validation.itertuples():
    print(
        f"{row.group}: faithfulness {row.faithfulness:.2f}; zero-ablation drop {row.zero_drop:.2f} "
        f"(random {row.random_zero_drop:.2f}); clamp shift {row.clamp_shift:.2f} "
        f"(predicted {row.clamp_shift_predicted:.2f}); replacement {row.replacement_score:.2f}, "
        f"completeness {row.completeness_score:.2f}"
    )
validation.set_index("group").T

# %% [markdown]
# The CD14+ Monocyte circuit as a table, strongest first. Its most influential genes, with the shipped marker sets
# that hold them:

# %%
mono = cc.get.circuit_df(adata, "bulk_labels", group="CD14+ Monocyte")
mono_genes = mono[mono["kind"] == "gene"].head(10)
print("top genes:", ", ".join(mono_genes["gene"]))
mono_genes[["gene", "influence", "attribution", "frequency", "is_marker", "marker_sets"]]

# %% [markdown]
# The strongest paths from an input (gene, prompt token or error node) to the target; `score` is a path's share of
# the target's influence. A path `gene:X -> target` is a direct effect through attention; longer ones pass through
# features (`L2.F123@answer`: feature 123 of layer 2 at the position where the answer starts; `@label`: on the
# tokens of the label being scored; `@template`: on the prompt's fixed text).

# %%
paths = circuits["paths"]
paths[paths["group"] == "CD14+ Monocyte"].head(8)

# %% [markdown]
# The circuit as a graph: genes on the bottom row, one row of features (blue) and error nodes (grey squares) per
# layer, the target on top. Node area grows with influence on the target, marker genes are orange, and an edge's
# colour gives the sign of its attribution (red: the source raises the node it feeds, blue: lowers it).

# %%
cc.pl.circuit(adata, "bulk_labels", group="CD14+ Monocyte", show=False)

# %% [markdown]
# The genes alone, ranked by influence; bars of known markers are coloured and name their sets.

# %%
cc.pl.circuit_genes(adata, "bulk_labels", group="CD14+ Monocyte", show=False)

# %% [markdown]
# For Cytoscape or Gephi, write the circuit as GraphML (or `.json` for d3); `cc.get.circuit` returns the same graph
# as a `networkx.DiGraph`.

# %%
out = Path(tempfile.mkdtemp())
graphml = cc.get.write_circuit(adata, "bulk_labels", out / "mono.graphml", group="CD14+ Monocyte")
graph = nx.read_graphml(graphml)
print(f"{graphml}: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges")

# %% [markdown]
# ## Everything is in the AnnData
#
# Activations, gene maps, rankings, enrichment, labels and circuits are all stored in `adata`, so they are saved
# and shared with it, and `cc.get` reads them back.

# %%
path = out / "pbmc68k_circuits.h5ad"
adata.write_h5ad(path)
saved = ad.read_h5ad(path)
print(sorted(saved.obsm), sorted(saved.uns["circuits"]))
cc.get.circuit_df(saved, "bulk_labels", group="CD19+ B").head(3)
