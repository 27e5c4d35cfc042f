"""Sphinx configuration: `pip install -e ".[docs]" && sphinx-build docs docs/_build`."""

project = "lamb_optax"
author = "lamb_optax developers"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
master_doc = "index"
autodoc_typehints = "description"
napoleon_google_docstring = True
exclude_patterns = ["_build"]
napoleon_use_ivar = True  # "Attributes:" as fields, not duplicate objects
