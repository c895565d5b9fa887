"""The mean point distances a run logs, split by what each one needs the model to have learned.

``fast3r_loss`` reports one distance per term (``regr_global/ii``, ``regr_local/ii``). Their mean,
``regr``, falls as soon as a model learns the scenes' average shape, and says nothing of where it
stops. The split does: ``regr_local`` is each view in its own frame (depth and shape, one image is
enough); ``regr_anchor`` is view 0 in the global frame, which is its own; ``regr_others`` is views
1.. in view 0's frame, which needs the cameras between the views. ``regr_others`` well above
``regr_anchor`` means the cameras are not learned (the learning runs of benchmarks/NOTES.md).
"""

from __future__ import annotations

PARTS = ("regr", "regr_local", "regr_anchor", "regr_others")


def point_distances(details: dict[str, float]) -> dict[str, float | None]:
    """``PARTS`` from ``fast3r_loss``'s details; a part with no term (no local head, one view) is None."""
    anchor = [details["regr_global/00"]] if "regr_global/00" in details else []
    others = [value for key, value in details.items() if key.startswith("regr_global/") and key != "regr_global/00"]
    local = [value for key, value in details.items() if key.startswith("regr_local/")]
    return {"regr": _mean(anchor + others + local), "regr_local": _mean(local), "regr_anchor": _mean(anchor),
            "regr_others": _mean(others)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
