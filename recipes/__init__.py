"""The recipes shipped with cratemae, installed as the package `cratemae.recipes`.

This folder is their one copy: pyproject.toml maps it to `cratemae.recipes`, so a clone, an
editable install and the wheel all read these files. This file makes the folder a regular
package, which an editable install (`pip install -e .`) needs to find it. Read them with
`cratemae recipes` or `cratemae.recipe.shipped`.
"""
