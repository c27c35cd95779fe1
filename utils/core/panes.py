"""Panes over several adapters: which model each pane runs (the base, or an adapter by name at a strength),
checked and turned into the rows of one batch.

A pane is `{"adapter": name or None, "strength": s}`, with an optional "format" (utils/core/prompt_format.py:
that pane's prompt format, in place of the shared one); the base is `None` (or "base"), the primary adapter is
also "fine_tuned". Up to MAX_PANES, no two alike (the same model in two formats is two panes). Nothing here loads an adapter: names are looked up among
those the server loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from utils.core.errors import InputError
from utils.core.inputs import check_strength
from utils.core.prompt_format import PromptFormat, parse_format
from utils.core.seam import BASE, FINE_TUNED, Backend, Row, strength_label

MAX_PANES = 6  # panes in one batch (as many as the sweep's strengths)
BASE_NAMES = (None, "", BASE)  # what names the base pane


@dataclass(frozen=True)
class Pane:
    """One pane's model: an adapter's name (None for the base) at a strength, and its own prompt format where
    it has one (None: the shared format)."""

    adapter: str | None
    strength: float = 1.0
    format: PromptFormat | None = None

    @property
    def label(self) -> str:
        if self.adapter is None:
            model = "Base"
        else:
            model = (
                self.adapter if self.strength == 1 else f"{self.adapter} ({strength_label(self.strength)})"
            )
        return model if self.format is None else f"{model} [{self.format.kind}]"


def parse_panes(panes, backend: Backend) -> list[Pane]:
    """Panes from a list of {"adapter", "strength"} (or its JSON text), each adapter among those loaded.

    Example: parse_panes([{"adapter": None}, {"adapter": "step-100", "strength": 0.5}], b)
    -> [Pane(None, 0.0), Pane("step-100", 0.5)]
    """
    if isinstance(panes, str):
        try:
            panes = json.loads(panes) if panes.strip() else []
        except ValueError:
            raise InputError(
                'panes must be a list such as [{"adapter": null}, {"adapter": "step-100", "strength": 1}].'
            ) from None
    if not isinstance(panes, (list, tuple)) or not panes:
        raise InputError('panes must list at least one pane: {"adapter": name or null, "strength": s}.')
    if len(panes) > MAX_PANES:
        raise InputError(f"At most {MAX_PANES} panes in one batch; got {len(panes)}.")
    out = []
    for i, pane in enumerate(panes, start=1):
        if not isinstance(pane, dict) or not set(pane) <= {"adapter", "strength", "format"}:
            raise InputError(
                f'Pane {i} must be {{"adapter": name or null, "strength": s, "format": optional}}.'
            )
        model = _pane(pane.get("adapter"), pane.get("strength", 1.0), backend, f"Pane {i}")
        fmt = pane.get("format")
        out.append(replace(model, format=None if fmt is None else parse_format(fmt, f"Pane {i}'s format")))
    return _distinct(out)


def cross_panes(adapters, strengths: list[float], backend: Backend) -> list[Pane]:
    """Every adapter at every strength (the base once), in order: a sweep over adapters and strengths.

    Example: cross_panes(["base", "step-100", "final"], [1.0], b) -> base, step-100, final
    """
    if isinstance(adapters, str):
        adapters = [a.strip() for a in adapters.split(",") if a.strip()]
    if not adapters:
        raise InputError("Choose at least one model: the base or an adapter.")
    out = []
    for name in adapters:
        if name in BASE_NAMES:
            out.append(Pane(None, 0.0))
        else:
            out += [_pane(name, s, backend, f"Adapter {name}") for s in strengths]
    out = list(dict.fromkeys(out))
    if len(out) > MAX_PANES:
        raise InputError(
            f"{len(out)} panes (each model at each strength); at most {MAX_PANES} run in one batch."
        )
    return out


def parse_pane_text(text: str, backend: Backend, shared: PromptFormat | None = None) -> list[Pane]:
    """Panes typed as text: each a name, or name=s, separated by commas, "base" for the base; "@raw", "@chat",
    "@adapter" or "@custom" after one gives it that prompt format (with the shared format's system message and
    custom template).

    Example: parse_pane_text("base, step-100=0.5, final=1.5@chat", b) -> base, step-100 at 0.5, final at 1.5
    in the base's chat template
    """
    panes = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        model, at, kind = part.partition("@")
        name, _, strength = model.partition("=")
        pane = {"adapter": name.strip(), "strength": strength.strip() if strength else 1.0}
        if at:
            extra = {"system": shared.system, "template": shared.template} if shared is not None else {}
            pane["format"] = {"kind": kind.strip(), **(extra if kind.strip() != "raw" else {})}
        panes.append(pane)
    return parse_panes(panes, backend)


def pane_formats(panes: list[Pane], rows: list[Row], shared: PromptFormat) -> dict:
    """Each pane row's prompt format (utils/core/prompt_format.format_rows): its own, else the shared one."""
    return {row.key: pane.format or shared for pane, row in zip(panes, rows, strict=True)}


def other_adapters(adapters, backend: Backend) -> list[str]:
    """Loaded adapters named in a request (a list, or names separated by commas), by their own names, each
    once, the primary left out (it is the fine-tuned pane already).

    Example: other_adapters("step-100, fine_tuned, step-100", b) -> ["step-100"]
    """
    if adapters is None or (isinstance(adapters, str) and not adapters.strip()):
        return []
    if isinstance(adapters, str):
        adapters = [a.strip() for a in adapters.split(",") if a.strip()]
    if not isinstance(adapters, (list, tuple)) or not all(isinstance(a, str) for a in adapters):
        raise InputError('adapters must be names separated by commas, such as "step-100, step-400".')
    primary = backend.adapter_named(FINE_TUNED)["name"] if backend.info.adapters else None
    names = [backend.adapter_named(a)["name"] for a in adapters]
    return [n for n in dict.fromkeys(names) if n != primary]


def _pane(adapter, strength, backend: Backend, where: str) -> Pane:
    if adapter in BASE_NAMES:
        return Pane(None, 0.0)
    if not isinstance(adapter, str):
        raise InputError(f"{where}: the adapter must be a name (text) or null for the base.")
    name = backend.adapter_named(adapter)["name"]  # "fine_tuned" -> the primary's own name
    return Pane(name, check_strength(strength, f"{where}'s strength"))


def _distinct(panes: list[Pane]) -> list[Pane]:
    for i, pane in enumerate(panes):
        if pane in panes[:i]:
            first = panes.index(pane) + 1
            raise InputError(f"Pane {i + 1} repeats pane {first} ({pane.label}); each pane must differ.")
    return panes


def pane_rows(panes: list[Pane]) -> list[Row]:
    """The batch rows of the panes, keyed p0, p1, ... in order."""
    return [
        Row(f"p{i}", pane.label, pane.strength if pane.adapter else 0.0, adapter=pane.adapter or None)
        for i, pane in enumerate(panes)
    ]


__all__ = [
    "BASE_NAMES",
    "FINE_TUNED",
    "MAX_PANES",
    "Pane",
    "cross_panes",
    "other_adapters",
    "pane_formats",
    "pane_rows",
    "parse_panes",
]
