"""The step-rule registry (issue 12 §1): UpdateProjector finds its mode there, and a new rule
is one decorated function, with no change to the projector."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from frontier_trainer import geometry, rules
from frontier_trainer.projection import UpdateProjector


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


@pytest.fixture
def registry() -> Iterator[None]:
    """Restore the registry after a test registers its own rules."""
    saved = dict(rules._REGISTRY)
    yield
    rules._REGISTRY.clear()
    rules._REGISTRY.update(saved)


def problem(seed: int = 0, m: int = 2) -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]], torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in [(6, 4), (7,)]]
    dirs = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] for _ in range(m)]
    return params, dirs, gen


def step(projector: UpdateProjector, params, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """One random 'optimizer' step through the projector: (raw u, applied δ), measured here."""
    before = flat([p.detach() for p in params])
    projector.before_step()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    raw = flat([p.detach() for p in params]) - before
    projector.after_step()
    return raw, flat([p.detach() for p in params]) - before


def test_builtin_rules_are_registered() -> None:
    assert {"nullspace", "frontier"} <= set(rules.step_rule_names())
    assert rules.get_step_rule("frontier").needs_tolerances
    assert not rules.get_step_rule("nullspace").needs_tolerances


def test_unknown_mode_lists_the_registered_rules() -> None:
    params, _, _ = problem()
    with pytest.raises(ValueError, match=r"registered step rules \('frontier', 'nullspace'.*got 'nulspace'"):
        UpdateProjector(params, mode="nulspace")


def test_a_new_rule_is_used_without_touching_the_projector(registry: None) -> None:
    """A rule that removes half of u's component in span(C): the applied step, measured from the
    parameters, is u − ½ P_C u, and the rule's state persists between steps until new
    directions are installed."""
    calls: list[int] = []

    @rules.register_step_rule("half_nullspace")
    def half(gram: torch.Tensor, context: rules.RuleContext) -> list[float]:
        context.state["steps"] = context.state.get("steps", 0) + 1
        calls.append(context.state["steps"])
        w = context.direction_pinv @ gram[1:, 0]
        return [1.0, *(-0.5 * w).tolist()]

    params, dirs, gen = problem()
    projector = UpdateProjector(params, mode="half_nullspace")
    projector.set_directions(dirs)
    C = torch.stack([flat(d) for d in dirs], dim=1)
    for _ in range(2):
        raw, delta = step(projector, params, gen)
        in_span = C @ torch.linalg.lstsq(C, raw).solution
        torch.testing.assert_close(delta, raw - 0.5 * in_span, rtol=1e-10, atol=1e-12)
    projector.set_directions(dirs)
    step(projector, params, gen)
    assert calls == [1, 2, 1]  # the state was emptied with the new directions


def test_registration_errors(registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        rules.register_step_rule("nullspace")(lambda gram, context: [1.0])
    rules.register_step_rule("nullspace", replace=True)(rules.nullspace_rule)
    with pytest.raises(ValueError, match="non-empty string name"):
        rules.register_step_rule("")


def test_rule_needing_tolerances_is_checked_at_set_directions(registry: None) -> None:
    rules.register_step_rule("my_frontier", needs_tolerances=True)(rules.frontier_rule)
    params, dirs, _ = problem()
    with pytest.raises(ValueError, match="my_frontier mode needs one tolerance per direction: 2 directions, 1"):
        UpdateProjector(params, mode="my_frontier", tolerances=[0.1]).set_directions(dirs)


def test_a_rule_returning_the_wrong_shape_is_refused(registry: None) -> None:
    rules.register_step_rule("broken")(lambda gram, context: [1.0])
    params, dirs, gen = problem()
    projector = UpdateProjector(params, mode="broken")
    projector.set_directions(dirs)
    with pytest.raises(ValueError, match="step rule 'broken' returned 1 coefficients for a 3x3 Gram matrix"):
        step(projector, params, gen)
    rules.register_step_rule("nan_rule")(lambda gram, context: [math.nan] * gram.shape[0])
    projector = UpdateProjector(params, mode="nan_rule")
    projector.set_directions(dirs)
    with pytest.raises(ValueError, match="'nan_rule' returned non-finite"):
        step(projector, params, gen)


def test_builtin_rules_match_geometry_on_the_measured_gram() -> None:
    """Through the registry, each built-in rule gives geometry's coefficients for the Gram
    matrix computed here from the vectors, and the frontier rule keeps its active set."""
    params, dirs, gen = problem(m=3)
    for mode, tol in (("nullspace", None), ("frontier", [0.0, 0.05, math.inf])):
        projector = UpdateProjector(params, mode=mode, tolerances=tol)
        projector.set_directions(dirs)
        raw, delta = step(projector, params, gen)
        V = torch.stack([raw] + [flat(d) for d in dirs])
        gram = V @ V.T
        a = (
            geometry.nullspace_coefficients(gram)
            if mode == "nullspace"
            else geometry.solve_frontier_step(gram, tol)
        )
        torch.testing.assert_close(delta, V.T @ a, rtol=1e-9, atol=1e-12)
        if mode == "frontier":
            assert "active" in projector._rule_state
