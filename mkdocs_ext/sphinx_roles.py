"""Griffe extension: Sphinx roles in docstrings become mkdocstrings cross-references.

The code base writes cross-references the Sphinx way (``:func:`~samplers.smc.smc```,
``:class:`LLMFeynmanKac```), which mkdocstrings would print verbatim. At load time this extension
rewrites each role into an *optional* autorefs reference, ``<autoref identifier="samplers.smc.smc"
optional><code>smc</code></autoref>``: a link when the target is rendered somewhere on the site,
plain code otherwise (never a broken link, never a strict-build warning). Relative names are
resolved against the object's module, then its class, as Sphinx does; ``~`` keeps the last
component as the title.

Enabled in ``mkdocs.yml`` (``handlers.python.options.extensions``).
"""

from __future__ import annotations

import html
import re

import griffe

__all__ = ["SphinxRoles", "convert"]

_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|obj|exc|const):`(~?)([^`<>]+?)`")


def _resolve(name: str, obj) -> str:
    """Full path of ``name`` as seen from ``obj`` (best effort; unknown names are kept)."""
    name = name.strip().lstrip(".")
    if obj is None:
        return name
    scopes = []
    try:
        scopes.append(obj.module)
    except Exception:  # noqa: BLE001 - not every object has a module
        pass
    parent = obj if obj.is_class else getattr(obj, "parent", None)
    if parent is not None and getattr(parent, "is_class", False):
        scopes.insert(0, parent)
    head = name.split(".")[0]
    for scope in scopes:
        try:
            if head in scope.members:
                return f"{scope.path}.{name}"
        except Exception:  # noqa: BLE001 - aliases that cannot be resolved
            continue
    return name


def convert(text: str, obj=None) -> str:
    """``text`` with every Sphinx role replaced by an optional autorefs reference."""

    def repl(m: re.Match) -> str:
        tilde, target = m.group(2), m.group(3).strip()
        target = target.rstrip("()") if m.group(1) in ("func", "meth") else target
        title = target.split(".")[-1] if tilde else target
        if m.group(1) in ("func", "meth"):
            title += "()"
        ident = _resolve(target, obj)
        return (f'<autoref identifier="{html.escape(ident)}" optional>'
                f"<code>{html.escape(title)}</code></autoref>")

    return _ROLE.sub(repl, text)


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring (see the module docstring)."""

    def on_instance(self, *, obj, **kwargs) -> None:  # griffe ≥ 1: called for every object
        doc = getattr(obj, "docstring", None)
        if doc is not None and doc.value and ":" in doc.value:
            doc.value = convert(doc.value, obj)
