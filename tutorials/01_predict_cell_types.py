# %% [markdown]
# # Predicting cell types with a Cell2Sentence model
#
# This tutorial turns cells into *cell sentences*, loads the small C2S model shipped with cellcircuits and
# predicts cell types by scoring each candidate label with the model. It runs offline on 2 CPU cores in seconds.
# (Open it as a notebook with `jupytext --to notebook 01_predict_cell_types.py`, or run it as a script.)

# %%
import pandas as pd

import cellcircuits as cc

adata = cc.ds.pbmc68k()
adata

# %% [markdown]
# `.X` of `pbmc68k_reduced` is scaled (it has negative values), so cell sentences are built from `.raw`, which
# holds log-normalised values. `use_raw=None` (the default) picks `.raw` when it exists, as scanpy does.

# %%
cc.pp.cell_sentences(adata)
print(adata.obs["cell_sentence"].iloc[0][:120], "...")

# %% [markdown]
# The shipped model records the prompt settings it was trained with: the C2S template, 100 genes per sentence,
# and its 10 labels.

# %%
model = cc.models.load("pbmc68k-tiny", device="cpu")
print(model)
print(model.build_prompts(adata.obs["cell_sentence"][:1])[0].text[:300], "...")

# %% [markdown]
# Each gene is spelled by one or more BPE tokens; `tokenize_prompts` says which.

# %%
tokenized = cc.models.tokenize_prompts(model.tokenizer, model.build_prompts(adata.obs["cell_sentence"][:1]))[0]
for gene, positions in list(zip(tokenized.genes, tokenized.gene_positions, strict=True))[:5]:
    print(gene, model.tokenizer.convert_ids_to_tokens([tokenized.input_ids[i] for i in positions]))

# %% [markdown]
# Predict the held-out cells (the model never saw them) and compare with the labels.

# %%
test = adata[adata.obs["split"] == "test"].copy()
cc.tl.predict_cell_types(test, model)
accuracy = (test.obs["c2s_cell_type"].astype(str) == test.obs["bulk_labels"].astype(str)).mean()
print(f"held-out accuracy: {accuracy:.3f}")
pd.crosstab(test.obs["bulk_labels"], test.obs["c2s_cell_type"])

# %% [markdown]
# Per-label probabilities are in `.obsm["c2s_cell_type_proba"]`; `cc.get` returns them with label names, e.g. to
# find uncertain cells:

# %%
proba = cc.get.cell_type_probabilities(test)
print(proba.max(axis=1).sort_values().head())
