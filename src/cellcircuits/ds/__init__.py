"""Embedded data sets."""

from ._gene_sets import gene_sets, list_gene_sets, read_gmt
from ._pbmc import pbmc68k

__all__ = ["gene_sets", "list_gene_sets", "pbmc68k", "read_gmt"]
