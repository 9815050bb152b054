"""Step rules: how a projected step is chosen from the Gram matrix of [u, c_1, …, c_m].

:class:`~frontier_trainer.projection.UpdateProjector` reduces every optimizer step to one small
matrix, the (m+1)×(m+1) Gram matrix G of the raw update u and the capability directions c_i,
and writes δ = a_0 u + Σ a_i c_i. A *step rule* is the map G → a. The projector looks its
``mode`` up in this registry, so a new rule is one decorated function, with no change to the
optimizer seam::

    from frontier_trainer.rules import register_step_rule

    @register_step_rule("half_nullspace")
    def half_nullspace(gram, context):
        w = context.direction_pinv @ gram[1:, 0]
        return [1.0, *(-0.5 * w).tolist()]

    UpdateProjector(params, mode="half_nullspace")

Registered here:

* ``"nullspace"``: δ = P_{C⊥}u (Thm 4.3 with δ_C = 0, unscaled), a = (1, −(G_CC)⁺G_Cu) with
  the generalised inverse cached by the projector per refresh.
* ``"frontier"``: δ maximises ⟨u, δ⟩ with ‖δ‖ ≤ ‖u‖ and ⟨ĉ_i, δ⟩ ≥ −ε_i‖u‖ (Thm 4.1/4.3 made
  operational), :func:`frontier_trainer.geometry.solve_frontier_qp`, warm-started from the
  previous step's active set (``context.state["active"]``); the number of steps that fell back
  to the null-space step is kept in ``context.state["fallbacks"]``.

This module imports only :mod:`frontier_trainer.geometry`; it never imports the projector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from frontier_trainer import geometry

__all__ = ["RuleContext", "StepRule", "get_step_rule", "register_step_rule", "step_rule_names"]


@dataclass
class RuleContext:
    """What a rule may use besides the Gram matrix.

    Attributes:
        tolerances: one ε_i ≥ 0 (or inf) per direction, for rules registered with
            ``needs_tolerances=True``; None otherwise.
        direction_pinv: the m×m generalised inverse of the directions' Gram block G_CC
            (:func:`geometry.pinv_psd`'s rank rule), computed once per refresh.
        state: scratch a rule may keep between steps (e.g. a warm start); the projector
            empties it whenever the directions change.
    """

    tolerances: list[float] | None
    direction_pinv: torch.Tensor
    state: dict[str, Any] = field(default_factory=dict)


#: A rule's function: (gram, context) -> coefficients a of shape (m+1,).
StepRuleFn = Callable[[torch.Tensor, RuleContext], "torch.Tensor | Sequence[float]"]


@dataclass(frozen=True)
class StepRule:
    """A registered rule: its name, its function and whether it needs per-direction tolerances."""

    name: str
    fn: StepRuleFn
    needs_tolerances: bool = False

    def __call__(self, gram: torch.Tensor, context: RuleContext) -> list[float]:
        """The rule's coefficients as floats, checked: one per vector of the Gram matrix, finite."""
        out = self.fn(gram, context)
        a = out.tolist() if isinstance(out, torch.Tensor) else [float(x) for x in out]
        if len(a) != gram.shape[0]:
            raise ValueError(
                f"step rule {self.name!r} returned {len(a)} coefficients for a {gram.shape[0]}x{gram.shape[0]} "
                "Gram matrix: it must return one per vector of [u, c_1, ..., c_m]"
            )
        if not all(map(math.isfinite, a)):
            raise ValueError(f"step rule {self.name!r} returned non-finite coefficients {a}")
        return a


_REGISTRY: dict[str, StepRule] = {}


def register_step_rule(
    name: str, *, needs_tolerances: bool = False, replace: bool = False
) -> Callable[[StepRuleFn], StepRuleFn]:
    """Decorator registering ``fn(gram, context) -> a`` as the step rule ``name``.

    Args:
        name: the ``mode`` under which :class:`UpdateProjector` finds it.
        needs_tolerances: the projector then requires one tolerance per direction.
        replace: allow overriding an existing rule of that name (otherwise an error, so two
            plugins cannot silently shadow each other).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a step rule needs a non-empty string name, got {name!r}")

    def decorator(fn: StepRuleFn) -> StepRuleFn:
        if name in _REGISTRY and not replace:
            raise ValueError(f"a step rule named {name!r} is already registered (pass replace=True to override it)")
        _REGISTRY[name] = StepRule(name=name, fn=fn, needs_tolerances=needs_tolerances)
        return fn

    return decorator


def get_step_rule(name: str) -> StepRule:
    """The rule registered as ``name``; the error lists the registered names."""
    rule = _REGISTRY.get(name) if isinstance(name, str) else None
    if rule is None:
        known = ", ".join(repr(n) for n in step_rule_names())
        raise ValueError(
            f"mode must be one of the registered step rules ({known}), got {name!r}; "
            "add a rule with frontier_trainer.rules.register_step_rule"
        )
    return rule


def step_rule_names() -> list[str]:
    """Names of the registered step rules, sorted."""
    return sorted(_REGISTRY)


@register_step_rule("nullspace")
def nullspace_rule(gram: torch.Tensor, context: RuleContext) -> list[float]:
    """δ = P_{C⊥}u (Thm 4.3 with δ_C = 0): a = (1, −w) with w = (G_CC)⁺ G_Cu, the same
    coefficients as :func:`geometry.nullspace_coefficients` with the inverse cached."""
    w = context.direction_pinv @ gram[1:, 0].contiguous()
    return [1.0, *(-w).tolist()]


@register_step_rule("frontier", needs_tolerances=True)
def frontier_rule(gram: torch.Tensor, context: RuleContext) -> torch.Tensor:
    """The frontier step (Thm 4.1/4.3), warm-started from the previous step's active set."""
    assert context.tolerances is not None
    solution = geometry.solve_frontier_qp(gram, context.tolerances, warm_start=context.state.get("active"))
    context.state["active"] = solution.active
    if not solution.converged:  # the null-space fallback was used (geometry logs it once)
        context.state["fallbacks"] = context.state.get("fallbacks", 0) + 1
    return solution.coefficients
