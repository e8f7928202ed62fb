"""What a results.json must hold before `lifelong report` and the notebooks read it: a damaged or
foreign file is named in one ValueError instead of failing later with a KeyError or TypeError."""

from __future__ import annotations


def is_number(value) -> bool:
    """A JSON number (NaN and infinity included: results.json writes them), not true or false."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shape_error(where, what: str) -> ValueError:
    """The error for a results.json that does not hold what a run writes: the file, and what is wrong."""
    return ValueError(f"{where} is not a lifelong results file ({what})")


# Optional fields of results.json and the JSON type each must have when present.
FIELD_TYPES = {"config": dict, "experts": dict, "domain_info": list, "growth_events": list, "num_experts": list,
               "experience_steps": list, "seeds": list, "runs": list}


def check_results(results, where) -> dict:
    """`results` (read from `where`) when it has the shape RunRecord reads: domains and stages, the
    stage x domain matrices of numbers, and the type of every optional field; else `shape_error`."""
    if not isinstance(results, dict):
        raise shape_error(where, f"expected a JSON object, got {json_kind(results)}")
    for key in ("domains", "stages"):
        value = results.get(key)
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise shape_error(where, f"{key}: expected a non-empty list of strings" if key in results else f"no {key}")
    rows, cols = len(results["stages"]), len(results["domains"])
    for key in ("loss_matrix", "bpb_matrix"):
        m = results.get(key)
        if not (isinstance(m, list) and len(m) == rows
                and all(isinstance(r, list) and len(r) == cols and all(map(is_number, r)) for r in m)):
            raise shape_error(where, f"{key}: expected {rows} rows of {cols} numbers" if key in results
                              else f"no {key}")
    for key, kind in FIELD_TYPES.items():
        if results.get(key) is not None and not isinstance(results[key], kind):
            raise shape_error(where, f"{key}: expected {json_kind(kind())}, got {json_kind(results[key])}")
    config = results.get("config") or {}
    for section in ("strategy", "model", "growth", "train"):
        if not isinstance(config.get(section, {}), dict):
            raise shape_error(where, f"config.{section}: expected an object, got {json_kind(config[section])}")
    if not all(isinstance(d, dict) for d in results.get("domain_info") or []):
        raise shape_error(where, "domain_info: expected one object per domain")
    if not all(isinstance(e, dict) and is_number(e.get("step")) and is_number(e.get("added"))
               for e in results.get("growth_events") or []):
        raise shape_error(where, "growth_events: expected objects with a step and the experts added")
    if results.get("seeds") and not all(isinstance(r, str) for r in results.get("runs") or []):
        raise shape_error(where, "runs: expected the seed directories of a multi-seed run")
    return results


def json_kind(value) -> str:
    """What a JSON value is, in words: "an object", "a list", "a string", "null", ..."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "a number")
