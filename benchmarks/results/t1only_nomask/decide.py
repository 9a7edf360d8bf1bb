"""RULE.md applied to two benchmarks/spatial_3d.py results on dev2 (no judgement in between).

    python benchmarks/results/t1only_nomask/decide.py CANDIDATE.json BASELINE.json

Prints each split's TPR for lesions >= 0.5 mL (refused scans' lesions counted as missed),
pooled PPV and healthy median flagged volume for both, each criterion with its verdict, and
the decision; exits 0 when adopted, 1 when not, 2 on a bad argument.
"""

import json
import sys


def figures(result: dict, split: str) -> dict:
    summary = result["splits"][split]["summary"]
    return {"tpr": summary["pooled_tpr_lesions_ge_0.5ml_refused_as_missed"],
            "ppv": summary["lesioned"]["pooled_ppv"],
            "healthy_ml": summary["healthy"]["median_flagged_ml"],
            "refused": summary["n_refused"], "n_large": summary["n_lesions_ge_0.5ml"]}


def decide(candidate: dict, baseline: dict) -> tuple[bool, list[str]]:
    if not baseline.get("masks_set_aside") or candidate.get("brain_masks") != "atlas":
        raise SystemExit("the baseline must be run with --without-masks and the candidate "
                         "must be a model trained without masks")
    c_test, b_test = figures(candidate, "test"), figures(baseline, "test")
    c_loao, b_loao = figures(candidate, "loao"), figures(baseline, "loao")
    checks = [
        ("1. test healthy median lower", c_test["healthy_ml"] < b_test["healthy_ml"]),
        ("2. test pooled PPV higher", c_test["ppv"] > b_test["ppv"]),
        ("3. test TPR >= 0.5 mL (refused as missed) >= 0.5", c_test["tpr"] >= 0.5),
        ("4. loao healthy median lower", c_loao["healthy_ml"] < b_loao["healthy_ml"]),
    ]
    lines = []
    for split, c, b in (("test", c_test, b_test), ("loao", c_loao, b_loao)):
        lines.append(f"{split}: candidate TPR {c['tpr']:.3f} / PPV {c['ppv']:.3f} / healthy "
                     f"{c['healthy_ml']:.2f} mL; baseline {b['tpr']:.3f} / {b['ppv']:.3f} / "
                     f"{b['healthy_ml']:.2f} mL (refused {c['refused']} and {b['refused']}, "
                     f"{c['n_large']} lesions >= 0.5 mL on accepted scans)")
    lines += [f"{name}: {'holds' if ok else 'FAILS'}" for name, ok in checks]
    adopted = all(ok for _, ok in checks)
    lines.append("ADOPTED" if adopted else "NOT ADOPTED")
    return adopted, lines


def fail(message: str) -> None:
    """A bad argument: the message on stderr and status 2 (1 means "not adopted")."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_result(path: str) -> dict:
    try:
        result = json.loads(open(path).read())
    except (OSError, ValueError) as e:
        fail(f"cannot read '{path}' as a spatial_3d.py result: {e}")
    if not isinstance(result, dict) or "splits" not in result:
        fail(f"'{path}' is not a benchmarks/spatial_3d.py result")
    return result


if __name__ == "__main__":
    if len(sys.argv) != 3:
        fail("usage: decide.py CANDIDATE.json BASELINE.json")
    cand, base = (read_result(p) for p in sys.argv[1:3])
    adopted, lines = decide(cand, base)
    print("\n".join(lines))
    sys.exit(0 if adopted else 1)
