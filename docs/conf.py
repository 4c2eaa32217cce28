"""Sphinx configuration (API reference from numpydoc docstrings)."""

project = "cellcircuits"
author = "cellcircuits developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon", "sphinx.ext.intersphinx"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
autosummary_generate = True
napoleon_numpy_docstring = True
napoleon_google_docstring = False
intersphinx_mapping = {
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
}
html_theme = "alabaster"
