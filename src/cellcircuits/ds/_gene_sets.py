"""Gene-set collections shipped with the package, for enrichment analyses that need no network.

The collections live in ``cellcircuits/ds/_data`` as GMT files (one set per line: name, description, genes, all
tab-separated); ``_data/SOURCES.md`` states where each comes from and under which licence.
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import IO, Literal, overload

import pandas as pd


@dataclass(frozen=True)
class _Collection:
    file: str
    source: str
    license: str


_COLLECTIONS: dict[str, _Collection] = {
    "markers_immune": _Collection(
        file="markers_immune.gmt",
        source="Blood/immune cell-type markers compiled from Hao et al. 2021, Zheng et al. 2017, Villani et al. 2017 "
        "and Stuart et al. 2019 (citations per set)",
        license="BSD-3-Clause (cellcircuits)",
    ),
    "markers_heart": _Collection(
        file="markers_heart.gmt",
        source="Adult human heart cell-type markers compiled from Litviňuková et al. 2020 and Tucker et al. 2020 "
        "(citations per set)",
        license="BSD-3-Clause (cellcircuits)",
    ),
}


@dataclass(frozen=True)
class _Installed:
    package: str
    path: str
    source: str
    license: str


# Pathway libraries read from an installed package rather than shipped: the pyenrichr distribution's LICENSE file
# is CC BY-NC-SA 4.0, which a BSD package cannot redistribute, although the upstream data are CC BY 4.0 / CC0.
_INSTALLED: dict[str, _Installed] = {
    "go_bp_2023": _Installed(
        package="pyenrichr",
        path="data/GO_Biological_Process_2023",
        source="Gene Ontology Biological Process 2023 (Gene Ontology Consortium), Enrichr library as distributed "
        "in the pyenrichr package",
        license="GO: CC BY 4.0; pyenrichr distribution: see its LICENSE",
    ),
    "wikipathways_2023_human": _Installed(
        package="pyenrichr",
        path="data/WikiPathway_2023_Human",
        source="WikiPathways 2023 Human, Enrichr library as distributed in the pyenrichr package",
        license="WikiPathways: CC0; pyenrichr distribution: see its LICENSE",
    ),
}


def _installed_path(name: str) -> Path:
    """The file of an installed-package collection, found without importing the package."""
    from importlib.util import find_spec

    info = _INSTALLED[name]
    spec = find_spec(info.package)
    if spec is None or not spec.submodule_search_locations:
        msg = (
            f"gene-set collection {name!r} is read from the {info.package!r} package, which is not installed; "
            f"`pip install {info.package}` (or `pip install 'cellcircuits[pathways]'`) makes it available offline"
        )
        raise ModuleNotFoundError(msg)
    path = Path(next(iter(spec.submodule_search_locations))) / info.path
    if not path.is_file():
        msg = f"{info.package} is installed but has no {info.path}; reinstall it from its source distribution"
        raise FileNotFoundError(msg)
    return path


def _clean_gene(token: str) -> str:
    # Enrichr-style libraries may carry a weight after a comma ("GENE,1.0"); drop it.
    return token.split(",", 1)[0].strip().upper()


def _parse_gmt(stream: IO[str], where: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    sets: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    for lineno, line in enumerate(stream, start=1):
        line = line.rstrip("\r\n")
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        name = fields[0].strip()
        if len(fields) < 2 or not name:
            msg = f"{where}, line {lineno}: a GMT line needs a set name and a description, separated by a tab"
            raise ValueError(msg)
        if name in sets:
            msg = f"{where}, line {lineno}: gene set {name!r} appears twice"
            raise ValueError(msg)
        genes = (_clean_gene(g) for g in fields[2:])
        sets[name] = list(dict.fromkeys(g for g in genes if g))  # unique, in file order
        descriptions[name] = fields[1].strip()
    return sets, descriptions


def _read_gmt_file(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    if not path.is_file():
        msg = f"No GMT file at {str(path)!r}"
        raise FileNotFoundError(msg)
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return _parse_gmt(fh, str(path))
    with open(path, encoding="utf-8") as fh:
        return _parse_gmt(fh, str(path))


@cache
def _read_shipped(name: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    resource = resources.files("cellcircuits.ds").joinpath("_data", _COLLECTIONS[name].file)
    with resource.open("rb") as raw:
        data = raw.read()
    if resource.name.endswith(".gz"):
        data = gzip.decompress(data)
    return _parse_gmt(io.StringIO(data.decode("utf-8")), f"shipped collection {name!r}")


@cache
def _read_installed(name: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    sets, descriptions = _read_gmt_file(_installed_path(name))
    source = _INSTALLED[name].source
    return sets, {k: v or source for k, v in descriptions.items()}


def _copy_sets(sets: dict[str, list[str]]) -> dict[str, list[str]]:
    """A copy of ``sets`` that shares no list with it (strings are immutable; ``copy.deepcopy`` is far slower)."""
    return {name: list(genes) for name, genes in sets.items()}


def _load(name: str | os.PathLike[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    if isinstance(name, str) and name in _COLLECTIONS:
        sets, descriptions = _read_shipped(name)
        return _copy_sets(sets), dict(descriptions)  # the cache must not be changed by callers
    if isinstance(name, str) and name in _INSTALLED:
        sets, descriptions = _read_installed(name)
        return _copy_sets(sets), dict(descriptions)
    path = Path(name)
    if path.is_file() or path.name.endswith((".gmt", ".gmt.gz")):
        return _read_gmt_file(path)
    available = ", ".join([*_COLLECTIONS, *_INSTALLED])
    msg = f"Unknown gene-set collection {str(name)!r}; available: {available} (or a path to a .gmt file)"
    raise ValueError(msg)


def read_gmt(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read a GMT file (plain or gzipped) into a dictionary of gene sets.

    Each line holds a set name, a description and the set's genes, separated by tabs. Symbols are upper-cased
    (cell sentences use upper-case symbols), a trailing ``,weight`` as in some Enrichr libraries is dropped, and
    repeated genes are kept once, in file order. Blank lines and lines starting with ``#`` are skipped.

    Parameters
    ----------
    path
        A ``.gmt`` file, or a gzip-compressed one whose name ends in ``.gz``.

    Returns
    -------
    Set name -> its genes, in file order (sets with no genes included).

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        If a line has no description field or a set name appears twice.

    Examples
    --------
    >>> import cellcircuits as cc
    >>> sets = cc.ds.read_gmt("my_sets.gmt.gz")  # doctest: +SKIP
    """
    return _read_gmt_file(Path(path))[0]


@overload
def gene_sets(
    name: str | os.PathLike[str] = ...,
    *,
    format: Literal["dict"] = ...,
    min_size: int = ...,
    max_size: int | None = ...,
) -> dict[str, list[str]]: ...


@overload
def gene_sets(
    name: str | os.PathLike[str] = ...,
    *,
    format: Literal["dataframe"],
    min_size: int = ...,
    max_size: int | None = ...,
) -> pd.DataFrame: ...


def gene_sets(
    name: str | os.PathLike[str] = "markers_immune",
    *,
    format: Literal["dict", "dataframe"] = "dict",
    min_size: int = 1,
    max_size: int | None = None,
) -> dict[str, list[str]] | pd.DataFrame:
    """A gene-set collection shipped with the package, or read from a GMT file.

    Shipped collections (see :func:`list_gene_sets`; sources and licences in ``cellcircuits/ds/_data/SOURCES.md``):

    - ``"markers_immune"``: canonical marker genes of blood/immune cell types (monocytes, dendritic cells, B and
      plasma cells, CD4/CD8/regulatory T cells, NK cells, platelets, erythrocytes, CD34+ progenitors), as in PBMC
      data.
    - ``"markers_heart"``: canonical marker genes of the cell types of the adult human heart.
    - ``"go_bp_2023"`` and ``"wikipathways_2023_human"``: Gene Ontology Biological Process 2023 (CC BY 4.0) and
      WikiPathways 2023 Human (CC0) as Enrichr libraries, read offline from the ``pyenrichr`` package when it is
      installed (``pip install 'cellcircuits[pathways]'``); not redistributed here, because that package's own
      licence file is non-commercial.

    Every marker set's description cites the publications it was compiled from (with their DOIs).

    Parameters
    ----------
    name
        A shipped collection, or a path to a ``.gmt``/``.gmt.gz`` file (read with :func:`read_gmt`).
    format
        ``"dict"``: set name -> list of unique upper-case gene symbols, in file order. ``"dataframe"``: a
        decoupler-style long table with columns ``source`` (set name), ``target`` (gene) and ``weight`` (1.0);
        ``df.attrs["descriptions"]`` maps each set to its description (the citation, for marker sets) and
        ``df.attrs["collection"]`` records ``name``.
    min_size
        Sets with fewer genes are dropped.
    max_size
        Sets with more genes are dropped; ``None`` keeps sets of any size.

    Returns
    -------
    The gene sets, as a dictionary or a long data frame (see ``format``).

    Raises
    ------
    ValueError
        If ``name`` is neither a shipped collection nor a GMT path, if the sizes or ``format`` are invalid, or if no
        set is left after the size filter.
    FileNotFoundError
        If ``name`` names a ``.gmt``/``.gmt.gz`` file that does not exist.

    Examples
    --------
    >>> import cellcircuits as cc
    >>> sets = cc.ds.gene_sets("markers_immune")
    >>> sets["CD14+ Monocyte"][:3]
    ['CD14', 'LYZ', 'S100A8']
    >>> net = cc.ds.gene_sets("markers_heart", format="dataframe")
    >>> list(net.columns)
    ['source', 'target', 'weight']
    """
    if format not in ("dict", "dataframe"):
        msg = f"format must be 'dict' or 'dataframe', got {format!r}"
        raise ValueError(msg)
    if min_size < 0 or (max_size is not None and max_size < 0):
        msg = f"min_size and max_size must be non-negative, got {min_size!r} and {max_size!r}"
        raise ValueError(msg)
    sets, descriptions = _load(name)
    kept = {k: v for k, v in sets.items() if len(v) >= min_size and (max_size is None or len(v) <= max_size)}
    if not kept:
        msg = (
            f"No gene set of {str(name)!r} has between {min_size} and {max_size if max_size is not None else 'any'} "
            f"genes ({len(sets)} sets before filtering)"
        )
        raise ValueError(msg)
    if format == "dict":
        return kept
    rows = [(source, target) for source, targets in kept.items() for target in targets]
    df = pd.DataFrame(rows, columns=["source", "target"])
    df["weight"] = 1.0
    df.attrs["descriptions"] = {k: descriptions[k] for k in kept}
    df.attrs["collection"] = str(name)
    return df


def list_gene_sets() -> pd.DataFrame:
    """The gene-set collections available: those shipped with the package and those of installed packages.

    Returns
    -------
    One row per collection: ``name`` (what :func:`gene_sets` takes), ``n_sets``, ``n_genes`` (distinct genes over
    all sets), ``source`` and ``license``.

    Examples
    --------
    >>> import cellcircuits as cc
    >>> cc.ds.list_gene_sets()["name"].tolist()[:2]
    ['markers_immune', 'markers_heart']
    """
    rows = []
    collections: dict[str, _Collection | _Installed] = {**_COLLECTIONS, **_INSTALLED}
    for name, info in collections.items():
        try:
            sets = _read_shipped(name)[0] if name in _COLLECTIONS else _read_installed(name)[0]
        except (ModuleNotFoundError, FileNotFoundError):
            continue  # an optional package that is not installed
        n_genes = len({g for genes in sets.values() for g in genes})
        rows.append(
            {"name": name, "n_sets": len(sets), "n_genes": n_genes, "source": info.source, "license": info.license}
        )
    return pd.DataFrame(rows, columns=["name", "n_sets", "n_genes", "source", "license"])
