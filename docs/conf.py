"""Sphinx configuration: API reference from numpydoc docstrings, tutorials rendered from ``tutorials/*.py``.

``python -m sphinx -W -b html docs docs/_build/html`` builds offline without warnings (``tests/test_docs.py`` does
this). Set ``CELLCIRCUITS_DOCS_EXECUTE=auto`` to run the tutorials while building (a few minutes on a CPU), and
``CELLCIRCUITS_DOCS_INTERSPHINX=1`` to link to the anndata/scanpy/torch docs (needs network).
"""

import os
from pathlib import Path

project = "cellcircuits"
author = "cellcircuits developers"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "myst_nb",
]
autosummary_generate = True
napoleon_numpy_docstring = True
napoleon_google_docstring = False
html_theme = "alabaster"
exclude_patterns = ["_build", "conf.py"]

# the tutorials live at the repository root (the test suite runs them); a copy is rendered here, as notebooks
_here = Path(__file__).parent
(_here / "tutorials").mkdir(exist_ok=True)
# a kernel header tells myst-nb the cells are Python (for highlighting and, when executing, which kernel)
_HEADER = """# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

"""
for _src in sorted((_here.parent / "tutorials").glob("*.py")):
    (_here / "tutorials" / _src.name).write_text(_HEADER + _src.read_text())
for _src in sorted((_here.parent / "tutorials").glob("*.md")):  # shown, not executed
    (_here / "tutorials" / _src.name).write_text(_src.read_text())
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
nb_execution_mode = os.environ.get("CELLCIRCUITS_DOCS_EXECUTE", "off")
nb_execution_timeout = 900
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".py": "myst-nb"}

intersphinx_mapping = {}
if os.environ.get("CELLCIRCUITS_DOCS_INTERSPHINX"):
    intersphinx_mapping = {
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "torch": ("https://pytorch.org/docs/stable/", None),
    }
