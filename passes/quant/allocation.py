"""Mixed precision under a budget: one format per unit (`llmc.passes.quant.sensitivity`) so that
the predicted KL, the sum of the units' own, is least while their bytes stay within the budget.

A multiple-choice knapsack, solved exactly by dynamic programming over the budget in RESOLUTION
steps (each choice's bytes rounded up to whole steps, so the plan never exceeds the budget); the
bytes the rounding leaves go to the single upgrades that lower the KL most and still fit. The
table's additive KL is the model (each unit's KL was measured with the others float).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from llmc.errors import OptionError
from llmc.passes.quant.sensitivity import Choice, Sensitivity


RESOLUTION = 4096                     # steps the budget is cut into


@dataclass(frozen=True)
class Plan:
    chosen: dict[str, Choice]          # unit name -> its format
    budget: int                        # bytes the units may take
    nbytes: int                        # bytes they take
    numel: int                         # their weights
    predicted_kl: float                # sum of the chosen KLs (nats per token)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def to_dict(self, sensitivity: Sensitivity) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "bytes": self.nbytes, "bits_per_weight": round(self.bits_per_weight, 4),
                "predicted_kl": self.predicted_kl,
                "units": [{"unit": u.name, "format": self.chosen[u.name].label, "bytes": self.chosen[u.name].nbytes,
                           "predicted_kl": self.chosen[u.name].kl} for u in sensitivity.units]}


def smallest(sensitivity: Sensitivity) -> int:
    return sum(min(c.nbytes for c in sensitivity.choices[u.name]) for u in sensitivity.units)


def allocate(sensitivity: Sensitivity, budget: int, option: str = "target_bpw") -> Plan:
    """The formats of least predicted KL within `budget` bytes (OptionError naming `option` when
    even the cheapest formats do not fit)."""
    units = [u.name for u in sensitivity.units]
    floor = smallest(sensitivity)
    numel = sum(u.numel for u in sensitivity.units)
    if floor > budget:
        raise OptionError(option, f"{budget:,} bytes ({8 * budget / numel:.3f} bits per weight) is less than "
                          f"the smallest these weights can be stored in: {floor:,} bytes "
                          f"({8 * floor / numel:.3f} bits per weight)")
    q = max(1, -(-budget // RESOLUTION))                 # bytes per step of the table
    steps = budget // q
    best = torch.zeros(steps + 1, dtype=torch.float64)   # least KL of the units so far within b steps
    picks = []
    for n in units:
        nxt = torch.full_like(best, math.inf)
        pick = torch.zeros(steps + 1, dtype=torch.long)
        for j, c in enumerate(sensitivity.choices[n]):
            w = -(-c.nbytes // q)                        # rounded up: the plan never exceeds the budget
            if w > steps:
                continue
            cand = best[:steps + 1 - w] + c.kl
            better = cand < nxt[w:]
            nxt[w:] = torch.where(better, cand, nxt[w:])
            pick[w:] = torch.where(better, j, pick[w:])
        best = nxt
        picks.append(pick)
    chosen: dict[str, Choice] = {}
    if math.isfinite(float(best[steps])):
        b = steps
        for n, pick in zip(reversed(units), reversed(picks)):
            c = sensitivity.choices[n][int(pick[b])]
            chosen[n] = c
            b -= -(-c.nbytes // q)
    else:                                                # the rounding lost the last bytes: start from the floor
        chosen = {n: min(sensitivity.choices[n], key=lambda c: (c.nbytes, c.kl)) for n in units}
    used = sum(c.nbytes for c in chosen.values())
    while True:                                          # the bytes left: the best single upgrade that fits
        upgrade = None
        for n in units:
            for c in sensitivity.choices[n]:
                gain, extra = chosen[n].kl - c.kl, c.nbytes - chosen[n].nbytes
                if gain > 0 and used + extra <= budget and (upgrade is None or gain > upgrade[0]):
                    upgrade = (gain, n, c, extra)
        if upgrade is None:
            break
        _, n, c, extra = upgrade
        chosen[n], used = c, used + extra
    chosen = {n: chosen[n] for n in units}
    return Plan(chosen, budget, used, numel, sum(c.kl for c in chosen.values()))
