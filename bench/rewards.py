"""Grading cost of hostile and huge responses, as ratios against a normal answer graded in the same run.

    python bench/rewards.py                    # full sizes (megabyte responses, 100k-deep nesting)
    python bench/rewards.py --scale 0.01 --repeats 1     # a smoke run

The baseline is one `score()` of a typical response (a few thousand characters of reasoning, then
`\\boxed{70^\\circ}`). Each input below is graded the same way and printed as `<name>_vs_normal_ratio`;
the last lines are `worst_vs_normal_ratio` and `normal_score_us` (the baseline in microseconds, the one
absolute figure, for orientation only). The grader reads at most the last SCAN_CHARS characters and at
most MAX_ANSWER_CHARS of an answer, so every ratio should stay bounded whatever the input size.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.rewards import score  # noqa: E402

NORMAL = ("Let me think. " * 300 + r"The third angle is 180 - 50 - 60 = 70. \boxed{70^\circ}", "70")


def hostile_inputs(scale: float) -> dict[str, tuple[str, str]]:
    """(response, reference) pairs; `scale` multiplies the sizes (1.0: megabyte responses)."""
    big, mb = max(1, int(100_000 * scale)), max(1, int(1_000_000 * scale))
    return {
        "algebra": (r"The line is \boxed{y = 3 + 2(x + 1)^2}", "2x^2 + 4x + 5"),
        "exact_vs_decimal": (r"\boxed{6.928}", r"4\sqrt{3}"),
        "self_correction": (r"\boxed{5}. Wait, that is wrong, the correct answer is \boxed{7}", "7"),
        "think_then_box": (r"<think>" + r"maybe \boxed{5}. " * 10 + r"</think> \boxed{7}", "7"),
        "power_tower": (r"\boxed{9^{9^{9^{9}}}}", "7"),
        "huge_exponent": (r"\boxed{10^{100000}}", "7"),
        "variable_huge_exponent": (r"\boxed{x^{99999999}}", "x"),
        "variable_polynomial": (r"\boxed{" + "+".join(f"x^{{{k}}}" for k in range(1, 20)) + "}", "x"),
        "long_plain": ("x" * big, "7"),
        "nested_braces": (r"\boxed{" + "{" * big + "7" + "}" * big + "}", "7"),
        "nested_sqrt_in_window": (r"\boxed{" + r"\sqrt{" * 500 + "7" + "}" * 501, "7"),
        "frac_repeats": (r"\boxed{" + r"\frac{" * big + "7", "7"),
        "open_boxes": (r"\boxed{" * big, "7"),
        "close_tags": ("</answer>" * (big // 2), "7"),
        "megabyte_digits": (r"\boxed{" + "1" * mb + "}", "7"),
        "text_cmds": (r"\boxed{" + r"\text{" * (big // 3) + "}", "7"),
        "backslashes": (r"\boxed{" + "\\" * big + "}", "7"),
        "many_boxes": (r"\boxed{7}" * 2000, "7"),
        "retractions": ((r"\boxed{7} that is wrong " * 400)[-3900:], "7"),
        "or_run": (r"\boxed{" + r"7 \text{ or } " * 400 + "}", "7"),
        "equality_chain": (r"\boxed{x = " + "= ".join(["7"] * 500) + "}", "7"),
        "huge_reference": (r"\boxed{7}", "7" * mb),
    }


def per_call_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best of `repeats` timings of one call (after a warm-up): the least disturbed by other load."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per input (the best is kept)")
    ap.add_argument("--scale", type=float, default=1.0, help="size multiplier for the huge inputs")
    args = ap.parse_args(argv)
    baseline = per_call_seconds(lambda: score(*NORMAL), args.repeats)
    ratios = {}
    for name, (response, reference) in hostile_inputs(args.scale).items():
        ratios[name] = per_call_seconds(lambda r=response, a=reference: score(r, a), args.repeats) / baseline
        print(f"{name}_vs_normal_ratio={ratios[name]:.2f}")
    print(f"worst_vs_normal_ratio={max(ratios.values()):.2f}")
    print(f"normal_score_us={baseline * 1e6:.1f}")
    return ratios


if __name__ == "__main__":
    main()
