"""AnnData -> Cell2Sentence cell sentences."""

from __future__ import annotations

import hashlib
import re
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator, Sequence

    from anndata import AnnData

_CHUNK = 2048  # rows densified/sorted at a time; bounds memory on backed and large data

# names that are not gene symbols (matched after upper-casing): Ensembl IDs of genes, transcripts, proteins or exons
# of any species (ENSG, ENSMUSG, ENSDARG, ...) with an optional version and GENCODE's _PAR_Y, and plain integers
_ENSEMBL = re.compile(r"ENS[A-Z]{0,6}[GTPE][0-9]{6,}(\.[0-9]+)?(_PAR_Y)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
#: share of names that may look like Ensembl IDs or integers before they are refused as not gene symbols
_MAX_ID_SHARE = 0.5
_MAX_GROUPS = 5  # colliding symbols named in the error

# splitmix64 constants: a cheap, well-mixed hash used as a reproducible random tie-break key
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CELL_MUL = np.uint64(0xC2B2AE3D27D4EB4F)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def name_hashes(names: Collection[str]) -> np.ndarray:
    """Stable 64-bit hashes of strings (Python's ``hash`` is salted per process, so it would not reproduce)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(n).encode(), digest_size=8).digest(), "little") for n in names),
        dtype=np.uint64,
        count=len(names),
    )


def tiebreak_keys(random_state: int, cells: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Pseudo-random ``uint64`` keys, a pure function of ``(random_state, cell, gene)``.

    Sorting tied genes by these keys orders ties randomly per cell, yet the result does not depend on how the
    cells are chunked, subset or ordered. ``cells`` and ``genes`` are ids such as :func:`name_hashes`.
    """
    # array arithmetic wraps modulo 2**64 silently, which is what the hash wants
    seed = np.full(np.shape(cells), random_state, dtype=np.uint64)
    z = seed * _GOLDEN + np.asarray(cells, dtype=np.uint64) * _CELL_MUL + np.asarray(genes, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def rank_genes(
    X: np.ndarray | sparse.spmatrix | sparse.sparray,
    cell_ids: np.ndarray,
    gene_ids: np.ndarray,
    n_genes: int | None,
    random_state: int,
) -> list[np.ndarray]:
    """Per row, the column indices of non-zero entries by descending value (ties by :func:`tiebreak_keys`).

    Parameters
    ----------
    X
        A block of rows (cells x genes) with non-negative finite values.
    cell_ids
        An id per row, e.g. :func:`name_hashes` of the obs names (feeds the tie-break).
    gene_ids
        An id per column, e.g. :func:`name_hashes` of the gene symbols (feeds the tie-break).
    n_genes
        Keep at most this many genes per row; ``None`` keeps all non-zero genes.
    random_state
        Seed of the tie-break.
    """
    X = sparse.csr_matrix(X)
    X.eliminate_zeros()
    X.sort_indices()
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    keys = tiebreak_keys(random_state, np.asarray(cell_ids)[rows], np.asarray(gene_ids)[X.indices])
    # lexsort sorts by the last key first: row, then descending value, then tie-break key
    order = np.lexsort((keys, -X.data, rows))
    ranked = np.split(X.indices[order], X.indptr[1:-1])
    if n_genes is not None:
        ranked = [r[:n_genes] for r in ranked]
    return ranked


def _numeric_block(block: np.ndarray | sparse.spmatrix, where: str) -> np.ndarray | sparse.spmatrix:
    """``block`` with real numeric values: booleans and float16 (which scipy.sparse lacks) become float32."""
    kind = block.dtype.kind
    if kind not in "biuf":
        msg = f"{where} holds values of dtype {block.dtype}; cell sentences need real numbers (expression values)."
        raise TypeError(msg)
    if kind == "b" or block.dtype == np.float16:
        return block.astype(np.float32)
    return block


def _check_block(block: np.ndarray | sparse.spmatrix, where: str) -> None:
    values = np.asarray(block.data if sparse.issparse(block) else block)
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        msg = f"{where} contains NaN or infinite values; cell sentences need finite expression values."
        raise ValueError(msg)
    if values.min() < 0:
        msg = (
            f"{where} contains negative values, as scaled data (sc.pp.scale) does. Cell sentences rank "
            "non-negative normalised expression: pass use_raw=True (if .raw holds log-normalised counts) or "
            "layer=<a layer of normalised counts>."
        )
        raise ValueError(msg)


def sentence_matrix(adata: AnnData, layer: str | None, use_raw: bool | None) -> tuple[Any, pd.Index, str]:
    """The matrix to rank, its var index and a name for messages (scanpy's ``use_raw=None`` semantics)."""
    if layer is not None and use_raw:
        msg = "Pass either layer or use_raw=True, not both."
        raise ValueError(msg)
    if use_raw is None:
        use_raw = layer is None and adata.raw is not None
    if use_raw:
        if adata.raw is None:
            msg = "use_raw=True but adata.raw is None."
            raise ValueError(msg)
        return adata.raw.X, adata.raw.var, "adata.raw.X"
    if layer is not None:
        if layer not in adata.layers:
            msg = f"Layer {layer!r} not found; adata.layers has {list(adata.layers.keys())}."
            raise KeyError(msg)
        return adata.layers[layer], adata.var, f"adata.layers[{layer!r}]"
    return adata.X, adata.var, "adata.X"


def var_where(where: str) -> str:
    """How the var of the matrix ``where`` (from :func:`sentence_matrix`) is spelled in messages."""
    return "adata.raw.var" if where.startswith("adata.raw") else "adata.var"


def gene_names(var: pd.DataFrame, gene_symbols: str | None = None, *, where: str = "adata.var") -> np.ndarray:
    """Upper-case gene symbols from ``var`` (its index, or the column ``gene_symbols``), checked for use.

    Cell sentences write genes as upper-case symbols stripped of surrounding whitespace, so the names are refused
    (before any work) when they could not be read back unambiguously: missing or empty names, names with inner
    whitespace, names of which most look like Ensembl IDs or integers rather than symbols, and names that collide
    once normalised (``'lyz'`` and ``'LYZ'``, ``' CD14'`` and ``'CD14'``).

    Parameters
    ----------
    var
        The ``.var`` (or ``.raw.var``) the genes come from.
    gene_symbols
        Column of ``var`` with the symbols; ``None`` uses its index (the var names).
    where
        How ``var`` is spelled in error messages (``"adata.var"``, ``"adata.raw.var"``).

    Returns
    -------
    The normalised symbols, one per row of ``var``.

    Raises
    ------
    KeyError
        When ``gene_symbols`` is not a column of ``var``.
    ValueError
        When there are no genes, or the names are not usable gene symbols (see above).
    """
    if gene_symbols is not None:
        if gene_symbols not in var.columns:
            msg = f"gene_symbols={gene_symbols!r} is not a column of var; columns are {list(var.columns)}."
            raise KeyError(msg)
        column = var[gene_symbols]
        source = f"{where}[{gene_symbols!r}]"
        missing = np.asarray(column.isna())
        if missing.any():
            msg = (
                f"{source} has {int(missing.sum())} missing gene symbol(s), e.g. for var_names "
                f"{[str(n) for n in var.index[missing][:5]]}; every gene needs a symbol. Fill them in or drop "
                "those genes."
            )
            raise ValueError(msg)
        original = np.asarray([str(n) for n in column], dtype=object)
    else:
        source = f"{where}_names"
        original = np.asarray([str(n) for n in var.index], dtype=object)
    names = np.asarray([n.strip().upper() for n in original], dtype=object)
    if len(names) == 0:
        msg = "The data has no genes (n_vars == 0)."
        raise ValueError(msg)
    _check_symbols(original, names, source, gene_symbols is None, list(var.columns))
    return names


def _check_symbols(original: np.ndarray, names: np.ndarray, source: str, from_index: bool, columns: list) -> None:
    """Refuse empty names, ID-like names, names with whitespace and names that collide once normalised."""
    hint = "pass gene_symbols=<a column of .var with gene symbols>"
    if from_index:
        listed = f"columns of .var: {columns}; " if columns else ""
        hint = f"set adata.var_names to gene symbols or {hint} ({listed}CELLxGENE data has gene_symbols='feature_name')"
    else:
        hint = f"{hint} (CELLxGENE data has gene_symbols='feature_name')"
    empty = names == ""
    if empty.any():
        msg = f"{source} holds {int(empty.sum())} empty name(s); every gene needs a gene symbol: {hint}."
        raise ValueError(msg)
    is_integer = np.fromiter((_INTEGER.fullmatch(n) is not None for n in names), dtype=bool, count=len(names))
    is_ensembl = np.fromiter((_ENSEMBL.fullmatch(n) is not None for n in names), dtype=bool, count=len(names))
    id_like = is_integer | is_ensembl
    if id_like.mean() > _MAX_ID_SHARE:
        if np.array_equal(names, np.arange(len(names)).astype(str)):
            kind = "a default integer index (0, 1, 2, ...)"
        elif is_ensembl.sum() >= is_integer.sum():
            kind = "Ensembl IDs"
        else:
            kind = "integers"
        msg = (
            f"{source} are not gene symbols: {id_like.sum()} of {len(names)} look like {kind}, e.g. "
            f"{list(original[id_like][:3])}. Cell sentences are written in gene symbols (e.g. LYZ, CD14), so "
            f"{hint}."
        )
        raise ValueError(msg)
    bad = [n for n in names if any(c.isspace() for c in n)]
    if bad:
        msg = f"Gene names in {source} must not contain whitespace (cell sentences are space-separated): {bad[:5]}"
        raise ValueError(msg)
    duplicated = pd.Series(names).duplicated(keep=False).to_numpy()
    if duplicated.any():
        shared = pd.unique(names[duplicated])
        groups = "; ".join(_collision(original[names == s], s) for s in shared[:_MAX_GROUPS])
        more = f"; and {len(shared) - _MAX_GROUPS} more" if len(shared) > _MAX_GROUPS else ""
        fix = "pass gene_symbols=<a column of .var with unique gene symbols>"
        if from_index:
            fix = f"make the var names distinct (rename, aggregate or drop duplicated genes) or {fix}"
        msg = (
            f"{source} give {len(shared)} gene symbol(s) to more than one gene once upper-cased and stripped of "
            f"surrounding whitespace, as cell sentences write them: {groups}{more}. A sentence would hold such a "
            f"gene twice and per-gene results would go to one of its entries only, so {fix}. "
            "adata.var_names_make_unique() only renames exact duplicates ('LYZ', 'LYZ' become 'LYZ', 'LYZ-1'); "
            "names that differ in case or surrounding whitespace, such as 'lyz' and 'LYZ', stay as they are."
        )
        raise ValueError(msg)


def _collision(members: np.ndarray, symbol: str) -> str:
    """``'lyz' and 'LYZ' both become 'LYZ'``, or ``'LYZ' occurs 2 times``."""
    if len(set(members)) == 1:
        return f"{members[0]!r} occurs {len(members)} times"
    quoted = [repr(m) for m in members]
    verb = "both become" if len(quoted) == 2 else "all become"
    return f"{', '.join(quoted[:-1])} and {quoted[-1]} {verb} {symbol!r}"


def cell_positions(cells: Sequence[int] | np.ndarray, n_obs: int) -> np.ndarray:
    """``cells`` as an array of row positions in ``[0, n_obs)``; a clear error for anything else."""
    idx = np.asarray(cells)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        msg = f"cells must be a 1-d sequence of integer row positions, got dtype {idx.dtype} and shape {idx.shape}"
        raise TypeError(msg)
    bad = idx[(idx < 0) | (idx >= n_obs)]
    if len(bad):
        msg = f"cells {bad[:5].tolist()} are outside the {n_obs} cells of adata"
        raise IndexError(msg)
    return idx.astype(np.int64)


def _take_rows(X: Any, rows: np.ndarray) -> Any:
    """``X[rows]`` for any order and repeats: backed (h5py) matrices only read increasing, distinct rows."""
    unique, inverse = np.unique(rows, return_inverse=True)
    block = X[unique]
    if len(unique) == len(rows) and np.array_equal(unique, rows):
        return block
    return (block if sparse.issparse(block) else np.asarray(block))[inverse]


def iter_ranked_genes(
    adata: AnnData,
    *,
    n_genes: int | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    cells: Sequence[int] | np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """Yield, per cell, the indices of its expressed genes by descending expression (chunked, backed-safe)."""
    X, var, where = sentence_matrix(adata, layer, use_raw)
    idx = np.arange(adata.n_obs) if cells is None else cell_positions(cells, adata.n_obs)
    gene_ids = name_hashes(gene_names(var, gene_symbols, where=var_where(where)))
    for start in range(0, len(idx), _CHUNK):
        sel = idx[start : start + _CHUNK]
        contiguous = len(sel) > 0 and sel[-1] - sel[0] == len(sel) - 1 and np.all(np.diff(sel) == 1)
        block = X[sel[0] : sel[-1] + 1] if contiguous else _take_rows(X, sel)
        if not sparse.issparse(block):
            block = np.asarray(block)
        block = _numeric_block(block, where)
        _check_block(block, where)
        yield from rank_genes(block, name_hashes(adata.obs_names[sel]), gene_ids, n_genes, random_state)


def sentence_gene_names(
    adata: AnnData, *, layer: str | None = None, use_raw: bool | None = None, gene_symbols: str | None = None
) -> np.ndarray:
    """Every gene a cell sentence of ``adata`` can hold (the checked symbols of the ranked matrix's genes)."""
    _, var, where = sentence_matrix(adata, layer, use_raw)
    return gene_names(var, gene_symbols, where=var_where(where))


def sentences_from_adata(
    adata: AnnData,
    *,
    n_genes: int | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    cells: Sequence[int] | np.ndarray | None = None,
) -> list[str]:
    """Cell sentences of (some) cells of ``adata`` without writing to it."""
    if n_genes is not None and int(n_genes) < 1:
        msg = f"n_genes must be a positive integer or None, got {n_genes!r}"
        raise ValueError(msg)
    _, var, where = sentence_matrix(adata, layer, use_raw)
    names = gene_names(var, gene_symbols, where=var_where(where))
    ranked = iter_ranked_genes(
        adata,
        n_genes=n_genes,
        layer=layer,
        use_raw=use_raw,
        gene_symbols=gene_symbols,
        random_state=random_state,
        cells=cells,
    )
    sentences = [" ".join(names[r]) for r in ranked]
    empty = [i for i, s in enumerate(sentences) if not s]
    if empty:
        obs_names = adata.obs_names[np.asarray(cells)[empty] if cells is not None else empty]
        warnings.warn(
            f"{len(empty)} cell(s) express no gene and get an empty sentence, e.g. {list(obs_names[:5])}.",
            UserWarning,
            stacklevel=3,
        )
    return sentences


def check_writable(adata: AnnData, copy: bool, tool: str) -> None:
    """Refuse, before any work, an AnnData ``tool`` could not write its results to (or copy, with ``copy=True``).

    Results of a backed AnnData go to its in-memory ``.obs``, ``.obsm`` and ``.uns``; a view of a backed AnnData can
    be neither written to nor copied, and copying a backed one would load it into memory.
    """
    if adata.isbacked and adata.is_view:
        msg = (
            f"{tool} cannot store results in a view of a backed AnnData, which anndata can neither write to nor "
            "copy; load those cells first with adata.to_memory()."
        )
        raise ValueError(msg)
    if copy and adata.isbacked:
        msg = (
            f"{tool}: copy=True cannot copy a backed AnnData (that would load it into memory); store the results in "
            "place (copy=False) or load it first with adata.to_memory()."
        )
        raise ValueError(msg)


def cell_sentences(
    adata: AnnData,
    n_genes: int | None = None,
    *,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_symbols: str | None = None,
    random_state: int = 0,
    key_added: str = "cell_sentence",
    copy: bool = False,
) -> AnnData | None:
    """Turn each cell into a Cell2Sentence "cell sentence".

    A cell sentence lists the cell's expressed genes (non-zero values) as upper-case symbols joined by spaces,
    most expressed first. Ties (frequent in log-normalised counts) are broken in a random order fixed by
    ``random_state``, the cell's obs name and the gene's symbol, so a cell's sentence is reproducible and does not
    depend on chunking, subsetting or the order of cells and genes.

    Parameters
    ----------
    adata
        Annotated data matrix (cells x genes); dense, sparse or backed.
    n_genes
        Keep the ``n_genes`` most expressed genes of each cell; ``None`` keeps every expressed gene. Prompts are
        cut again to the ``n_genes`` recorded with the model when they are built.
    layer
        Rank this layer instead of ``.X``. It must hold non-negative (normalised) values.
    use_raw
        Rank ``adata.raw.X``. ``None`` (default) uses ``.raw`` when it exists and no ``layer`` is given, like
        scanpy, since ``.X`` is often scaled.
    gene_symbols
        Column of ``.var`` (or ``.raw.var``) with gene symbols, when ``var_names`` are not symbols.
    random_state
        Seed of the tie-break between equally expressed genes.
    key_added
        Column of ``.obs`` that receives the sentences.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``. Sets the following fields:

    ``.obs[key_added]`` : :class:`str`, one per cell
        The cell sentence; empty (with a warning) for a cell that expresses no gene.
    ``.uns[key_added]['params']`` : :class:`dict`
        The parameters used.

    Raises
    ------
    ValueError
        On negative (scaled) or non-finite values; when the gene names (``var_names``, or the ``gene_symbols``
        column) are not usable gene symbols: empty or missing names, names with inner whitespace, mostly Ensembl
        IDs or integers, or names that collide once upper-cased and stripped (``'lyz'`` and ``'LYZ'``); for
        ``copy=True`` on a backed AnnData, or for a view of a backed AnnData (anndata can neither copy nor write
        to one). Nothing is written to ``adata`` when an error is raised.
    TypeError
        When the ranked matrix does not hold real numbers.
    KeyError
        On a missing ``layer`` or ``gene_symbols`` column.
    """
    check_writable(adata, copy, "cell_sentences")
    sentences = sentences_from_adata(
        adata, n_genes=n_genes, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols, random_state=random_state
    )
    adata = adata.copy() if copy else adata
    adata.obs[key_added] = pd.Series(sentences, index=adata.obs_names, dtype=object)
    if use_raw is None:
        use_raw = layer is None and adata.raw is not None
    adata.uns[key_added] = {
        "params": {
            "n_genes": -1 if n_genes is None else int(n_genes),
            "layer": "" if layer is None else layer,
            "use_raw": bool(use_raw),
            "gene_symbols": "" if gene_symbols is None else gene_symbols,
            "random_state": int(random_state),
        }
    }
    return adata if copy else None
