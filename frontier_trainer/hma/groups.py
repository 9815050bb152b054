"""Layer groups: which merge ratio α each tensor takes, and the rule for the outer tensors.

A tensor belongs to the decoder block whose index appears in its name (``...layers.<i>.``,
``...h.<i>.``, ``...blocks.<i>.``). Modes:

* ``"block"`` (default): one group per decoder block, key ``<prefix>layers.<i>``;
* ``"parts:K"``: K contiguous runs of blocks (the K = 3 of Lin et al. is ``parts:3``), key ``part<k>``;
* ``"module"``: one group per module inside a block (``...layers.<i>.self_attn.q_proj``, norms included).

The outer tensors (every tensor outside the blocks: token embeddings, final norm, LM head, tied or not)
follow one documented rule, applied identically to every method compared:

* ``outer="budget"`` (default): they take the *uniform-equivalent ratio of the budget*,
  ``t_B = sqrt(B / Σ_ℓ w_ℓ)``. For uniform averaging at t this is exactly t; for HMA at the same budget
  it is the same t, so HMA and uniform averaging differ only in how the blocks share the budget;
* ``outer="group"``: they form one more group, ``"outer"``, allocated like any block.

Why not "follow the first group" (mergekit's silent behaviour for gradient lists, field notes §1): it
makes the embeddings' ratio an accident of the first layer's geometry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

OUTER = "outer"
"""Group key of the outer tensors."""

_BLOCK = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")


def block_of(name: str) -> tuple[str, int, str] | None:
    """``(prefix, block index, rest)`` of a tensor name inside a decoder block, else ``None``."""
    m = _BLOCK.match(name)
    if m is None:
        return None
    return m.group("prefix"), int(m.group("index")), m.group("rest")


def _module_of(rest: str) -> str:
    """Module path inside a block: the name without its last component (``weight``/``bias``)."""
    return rest.rsplit(".", 1)[0] if "." in rest else rest


@dataclass(frozen=True)
class Grouping:
    """How tensors are grouped for allocation (see the module docstring).

    Attributes:
        mode: ``"block"``, ``"module"`` or ``"parts:K"``.
        outer: ``"budget"`` or ``"group"``.
    """

    mode: str = "block"
    outer: str = "budget"

    def __post_init__(self) -> None:
        if self.mode not in ("block", "module") and not re.fullmatch(r"parts:[1-9]\d*", self.mode):
            raise ValueError(f"grouping mode {self.mode!r}: use 'block', 'module' or 'parts:K' (K >= 1).")
        if self.outer not in ("budget", "group"):
            raise ValueError(f"outer rule {self.outer!r}: use 'budget' or 'group'.")

    @property
    def parts(self) -> int | None:
        """K for ``parts:K``, else ``None``."""
        return int(self.mode.split(":")[1]) if self.mode.startswith("parts:") else None

    def assign(self, names: Iterable[str]) -> dict[str, str]:
        """``{tensor name: group key}``; outer tensors map to :data:`OUTER`. Order of first appearance."""
        names = list(names)
        blocks = sorted({b[1] for n in names if (b := block_of(n)) is not None})
        if not blocks:
            raise ValueError("no decoder-block tensors found (names like '...layers.<i>....'): cannot group.")
        K = self.parts
        if K is not None and len(blocks) < K:
            raise ValueError(f"parts:{K} asks for more parts than the model's {len(blocks)} blocks.")
        rank = {b: i for i, b in enumerate(blocks)}
        out: dict[str, str] = {}
        for n in names:
            b = block_of(n)
            if b is None:
                out[n] = OUTER
            elif K is not None:
                out[n] = f"part{rank[b[1]] * K // len(blocks)}"
            elif self.mode == "block":
                out[n] = f"{b[0]}.{b[1]}"
            else:
                out[n] = f"{b[0]}.{b[1]}.{_module_of(b[2])}"
        return out

    def groups(self, names: Iterable[str]) -> list[str]:
        """Allocated group keys in model order (``"outer"`` last if ``outer == "group"``)."""
        assignment = self.assign(names)
        keys = list(dict.fromkeys(g for g in assignment.values() if g != OUTER))
        keys.sort(key=_order_key)
        if self.outer == "group" and OUTER in assignment.values():
            keys.append(OUTER)
        return keys

    def filters(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """``[(substring filter, group)]`` selecting every non-outer tensor, for a mergekit YAML.

        Filters are block (``model.layers.3.``) or module (``model.layers.3.mlp.up_proj.``) prefixes with
        a trailing dot, so ``layers.1.`` never matches ``layers.11.``; each tensor matches exactly one.
        """
        assignment = self.assign(names)
        seen: dict[str, str] = {}
        for n in names:
            b = block_of(n)
            if b is None:
                continue
            prefix = f"{b[0]}.{b[1]}." if self.mode != "module" else f"{b[0]}.{b[1]}.{_module_of(b[2])}."
            seen.setdefault(prefix, assignment[n])
        return list(seen.items())


def _order_key(group: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", group))


def alpha_of_tensor(name: str, group: str, alphas: dict[str, float], outer_alpha: float) -> float:
    """The ratio a tensor takes: its group's α, or ``outer_alpha`` for an outer tensor."""
    if group == OUTER:
        return float(alphas.get(OUTER, outer_alpha))
    try:
        return float(alphas[group])
    except KeyError:
        raise ValueError(
            f"no α for group {group!r} (tensor {name!r}); groups given: {sorted(alphas)}."
        ) from None
