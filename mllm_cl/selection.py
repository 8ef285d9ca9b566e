"""Choosing a method's option on validation sets, never silently on the numbers the matrix reports.

A method that picks among options after a task (WiSE-FT's α grid) must choose on sets that are not
reported: choosing on a reported set reports numbers selected on themselves (optimistic, and not
what the papers compare). `Selection` holds that protocol for any method:

- ``validation`` sets are scored only for the choice and never enter the accuracy matrix;
- ``select_on`` names the sets whose mean accuracy decides (default: every validation set);
- without either, ``criterion`` falls back to the stream's held-out sets ("heldout") or to every
  eval set ("avg"): both are reported sets, so they need ``allow_select_on_reported``;
- every refusal is one line naming the method's argument to change.
"""

from __future__ import annotations

from collections.abc import Sequence

from mllm_cl.errors import ConfigError


class Selection:
    """Which sets a choice is made on, and their scores (see the module docstring).

    Args:
        owner: the method's name, used in messages (e.g. "WiSEFT").
        validation: `EvalSet`s scored only for the choice.
        select_on: names of the deciding sets (validation or, if allowed, reported sets).
        criterion: "heldout" or "avg", used when neither `select_on` nor `validation` is given.
        allow_reported: allow deciding on sets the accuracy matrix reports.
    """

    def __init__(
        self,
        owner: str,
        validation: Sequence = (),
        select_on: Sequence[str] | None = None,
        criterion: str = "heldout",
        allow_reported: bool = False,
    ):
        if criterion not in ("heldout", "avg"):
            raise ConfigError(f"{owner}(criterion={criterion!r}): use 'heldout' or 'avg'")
        self.owner, self.validation, self.criterion = owner, list(validation), criterion
        self.select_on = list(select_on) if select_on else [v.name for v in self.validation]
        self.allow_reported = allow_reported

    @property
    def own(self) -> list[str]:
        return [v.name for v in self.validation]

    def keys(self, data) -> list[str]:
        """The deciding set names for the stream `data` (a `TaskData`); refuses a bad selection."""
        reported, own, who = data.eval_names, self.own, self.owner
        if clash := sorted(set(own) & set(reported)):
            raise ConfigError(f"{who}.validation names {clash} are also eval sets of the stream; rename them")
        keys = self.select_on
        if not keys and self.criterion == "heldout":
            keys = data.heldout_names
            if not keys:
                raise ConfigError(
                    f"{who}(criterion='heldout') needs data.heldout sets; add some or use criterion 'avg'"
                )
        keys = keys or reported
        if unknown := [k for k in keys if k not in own and k not in reported]:
            raise ConfigError(
                f"{who}.select_on {unknown}: not a validation set {own} nor an eval set {reported}"
            )
        if (chosen_on := [k for k in keys if k in reported]) and not self.allow_reported:
            raise ConfigError(
                f"{who} would choose on {chosen_on}, sets the accuracy matrix reports (biased); name "
                f"{who}.validation sets in select_on, or set allow_select_on_reported: true"
            )
        return keys

    def scores(self, ctx, keys: Sequence[str], reported: dict[str, float] | None = None) -> dict[str, float]:
        """{set: accuracy} of the model now on the deciding sets' sources: the stream's eval sets when
        a key is one of them (or `reported`, scores of this very model already taken), plus every
        validation set. Every rank must call it."""
        results: dict[str, float] = {}
        if any(k not in self.own for k in keys):
            results = dict(reported) if reported is not None else _values(ctx.evaluate())
        if any(k in self.own for k in keys):
            results.update(_values(ctx.evaluate(self.validation)))
        return results

    @staticmethod
    def mean(results: dict[str, float], keys: Sequence[str]) -> float:
        return sum(results[k] for k in keys) / len(keys)


def _values(results: dict) -> dict[str, float]:
    return {k: r.value for k, r in results.items()}
