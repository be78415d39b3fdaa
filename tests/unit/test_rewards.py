import ast
import builtins
import dataclasses
import inspect
from pathlib import Path

import pytest

from bench import rewards as rewards_bench
from core import answer_match, answers, latex_math, rewards
from core.rewards import (
    N_POINTS,
    ScoreResult,
    answers_match,
    expression_values,
    extract_answer,
    parse_number,
    score,
)

# (response, reference, expected reward, expected extracted)
CASES = [
    # right answers, several forms
    (r"so \boxed{7}", "7", 1.0, "7"),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0, "0.5"),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0, r"\frac{1}{2}"),
    (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0, r"\dfrac{1}{2}"),
    (r"\boxed{\tfrac12}", "0.5", 1.0, r"\tfrac12"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", "0.8660254", 1.0, r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{\frac{3\sqrt{2}}{2}}", "2.1213203", 1.0, r"\frac{3\sqrt{2}}{2}"),
    (r"\boxed{2\sqrt{13}}", r"\sqrt{52}", 1.0, r"2\sqrt{13}"),
    (r"\boxed{\sqrt 5}", r"\sqrt{5}", 1.0, r"\sqrt 5"),
    (r"\boxed{60^\circ}", "60", 1.0, r"60^\circ"),
    (r"\boxed{60^{\circ}}", "60", 1.0, r"60^{\circ}"),
    ("\\boxed{60°}", "60", 1.0, "60°"),
    (r"\boxed{60 degrees}", "60", 1.0, "60 degrees"),
    (r"\boxed{2\pi}", "6.2831853", 1.0, r"2\pi"),
    (r"\boxed{\frac{\pi}{3}}", "1.0471976", 1.0, r"\frac{\pi}{3}"),
    ("\\boxed{2π}", r"2\pi", 1.0, "2π"),
    ("<answer>12</answer>", "12", 1.0, "12"),
    ("<think>hmm</think><ANSWER> 12 </ANSWER>", "12", 1.0, "12"),
    (r"<answer>\boxed{12}</answer>", "12", 1.0, "12"),
    (r"\boxed{1,000}", "1000", 1.0, "1,000"),
    (r"\boxed{1{,}000}", "1000", 1.0, "1{,}000"),
    (r"\boxed{5 \text{ cm}}", "5", 1.0, r"5 \text{ cm}"),
    (r"\boxed{12 \text{square units}}", "12", 1.0, r"12 \text{square units}"),
    (r"\boxed{-3}", "-3", 1.0, "-3"),
    (r"\boxed{50\%}", "50", 1.0, r"50\%"),
    (r"\boxed{$\left( 3 \right)$}", "3", 1.0, r"$\left( 3 \right)$"),
    (r"\boxed{x = 5}", "5", 1.0, "x = 5"),
    (r"\boxed{1\,000}", "1000", 1.0, r"1\,000"),
    (r"\boxed{(B)}", "B", 1.0, "(B)"),
    (r"\boxed{\text{C}}", "(c)", 1.0, r"\text{C}"),
    (r"\boxed{x^2 + 1}", "x^2+1", 1.0, "x^2 + 1"),
    (r"\boxed{7}", r"worked out: \boxed{7}", 1.0, "7"),
    # wrong answers: format only
    (r"\boxed{8}", "7", 0.1, "8"),
    (r"\boxed{0.51}", "1/2", 0.1, "0.51"),
    (r"\boxed{0.5}", r"50\%", 0.1, "0.5"),  # 50% reads as 50, documented
    (r"\boxed{2x}", "2", 0.1, "2x"),
    (r"\boxed{\frac{\pi}{3}}", "60", 0.1, r"\frac{\pi}{3}"),  # radians are not degrees
    (r"\boxed{(A)}", "B", 0.1, "(A)"),
    (r"\boxed{1,2}", "12", 0.1, "1,2"),
    (r"\boxed{2 3}", "6", 0.1, "2 3"),
    # hedges: more than one answer never pays, whichever is right
    (r"\boxed{x = 7 \text{ or } x = 8}", "8", 0.1, r"x = 7 \text{ or } x = 8"),
    (r"\boxed{x = 7 \text{ or } x = 8}", "7", 0.1, r"x = 7 \text{ or } x = 8"),
    (r"\boxed{7 \text{ or } 8}", "8", 0.1, r"7 \text{ or } 8"),
    (r"\boxed{8 \text{ or more}}", "8", 0.1, r"8 \text{ or more}"),
    (r"\boxed{7 \lor 8}", "8", 0.1, r"7 \lor 8"),
    (r"\boxed{\pm 3}", "3", 0.1, r"\pm 3"),
    (r"\boxed{7; 8}", "8", 0.1, "7; 8"),
    (r"\boxed{7, 8}", "8", 0.1, "7, 8"),
    (r"\boxed{7 = 8}", "8", 0.1, "7 = 8"),
    (r"\boxed{7} \boxed{8}", "8", 0.1, "8"),
    (r"\boxed{7} \boxed{8}", "7", 0.1, "8"),
    (r"\boxed{8} or 7", "8", 0.1, "8"),
    (r"\boxed{8} (or maybe 7)", "8", 0.1, "8"),
    (r"\boxed{8} \text{ or } 7", "8", 0.1, "8"),
    # equality chains that agree, labels
    (r"\boxed{x = 180 - 30 - 40 = 110}", "110", 1.0, "x = 180 - 30 - 40 = 110"),
    (r"\boxed{m\angle 1 = 50}", "50", 1.0, r"m\angle 1 = 50"),
    (r"\boxed{AB = 5}", "5", 1.0, "AB = 5"),
    (r"\boxed{3 + 4 = 7}", "7", 1.0, "3 + 4 = 7"),
    (r"\boxed{8} or so I think", "8", 1.0, "8"),  # no second answer offered
    # mixed numbers
    (r"\boxed{2\frac{1}{2}}", "2.5", 1.0, r"2\frac{1}{2}"),
    (r"\boxed{2\frac{1}{2}}", "1", 0.1, r"2\frac{1}{2}"),
    (r"\boxed{13\frac{1}{3}}", r"\frac{40}{3}", 1.0, r"13\frac{1}{3}"),
    (r"\boxed{-2\frac{1}{2}}", "-2.5", 1.0, r"-2\frac{1}{2}"),
    (r"\boxed{2\frac12}", "2.5", 1.0, r"2\frac12"),
    (r"\boxed{2\frac{\sqrt{3}}{2}}", r"\sqrt{3}", 1.0, r"2\frac{\sqrt{3}}{2}"),  # not a mixed number
    # one-letter units inside \text{} / \mathrm{}
    (r"\boxed{5\text{ m}}", "5", 1.0, r"5\text{ m}"),
    (r"\boxed{25 \text{ m}^2}", "25", 1.0, r"25 \text{ m}^2"),
    (r"\boxed{25 \mathrm{m}^{2}}", "25", 1.0, r"25 \mathrm{m}^{2}"),
    (r"\boxed{3\frac{1}{4} \text{ m}}", "3.25", 1.0, r"3\frac{1}{4} \text{ m}"),
    # unformatted
    ("The answer is 7", "7", 0.0, None),
    ("7", "7", 0.0, None),
    ("<answer>7", "7", 0.0, None),
    # last boxed wins, nesting, empties, unbalanced
    (r"\boxed{3} no wait \boxed{7}", "7", 0.1, "7"),  # two different answers: a hedge, never paid
    (r"\boxed{7} so \boxed{7}", "7", 1.0, "7"),  # the same answer twice is one answer
    (r"\boxed{7} no wait \boxed{3}", "7", 0.1, "3"),
    (r"\boxed{\boxed{7}}", "7", 1.0, "7"),
    (r"\boxed{{7}}", "7", 1.0, "{7}"),
    (r"\boxed{\frac{1}{\sqrt{4}}}", "0.5", 1.0, r"\frac{1}{\sqrt{4}}"),
    (r"\boxed{}", "7", 0.0, None),
    (r"\boxed{   }", "7", 0.0, None),
    (r"<answer>\boxed{}</answer>", "7", 0.0, None),
    (r"\boxed{7", "7", 0.0, None),
    (r"\boxed{7} then \boxed{8", "7", 0.0, None),  # the last box never closes: no answer
    (r"\boxed{7\}", "7", 0.0, None),  # an escaped brace does not close the group
    (r"\boxed{7} <answer>8</answer>", "7", 1.0, "7"),  # a box beats the tags
    # algebraic answers: equal up to order or expansion (compared at fixed points, core.answer_match)
    (r"\boxed{3+2x}", "2x+3", 1.0, "3+2x"),
    (r"\boxed{2(x+1)}", "2x+2", 1.0, "2(x+1)"),
    (r"\boxed{x/2}", "(1/2)x", 1.0, "x/2"),
    (r"\boxed{\frac{x}{2}}", r"\frac{1}{2}x", 1.0, r"\frac{x}{2}"),
    (r"\boxed{(x+1)^2}", "x^2 + 2x + 1", 1.0, "(x+1)^2"),
    (r"\boxed{y = 3 + 2x}", "2x+3", 1.0, "y = 3 + 2x"),  # `y =` names the answer
    (r"\boxed{2x+2}", "2x+3", 0.1, "2x+2"),
    (r"\boxed{2y+3}", "2x+3", 0.1, "2y+3"),
    (r"\boxed{x^2}", "2x", 0.1, "x^2"),
    (r"\boxed{x+y}", "2x", 0.1, "x+y"),
    (r"\boxed{2x+3 \text{ or } 5}", "2x+3", 0.1, r"2x+3 \text{ or } 5"),  # still a hedge
    (r"\boxed{x^{99999999}}", "x", 0.1, "x^{99999999}"),  # exponent bound: not read, not equal as text
    (r"\boxed{x^{99999999}}", "x^{99999999}", 1.0, "x^{99999999}"),  # equal as text
    # LaTeX spacing commands inside the box
    (r"\boxed{\;12\;}", "12", 1.0, r"\;12\;"),
    (r"\boxed{\,12\,}", "12", 1.0, r"\,12\,"),
    (r"\boxed{\!12}", "12", 1.0, r"\!12"),
    (r"\boxed{\quad 12 \quad}", "12", 1.0, r"\quad 12 \quad"),
    (r"\boxed{~12~\text{cm}}", "12", 1.0, r"~12~\text{cm}"),
    # the final answer is after </think> (boxes in the thinking are drafts), else the last box
    (r"<think>maybe \boxed{5}</think> The answer is \boxed{7}", "7", 1.0, "7"),
    (r"<think>maybe \boxed{7}</think> The answer is \boxed{5}", "7", 0.1, "5"),
    (r"<think>\boxed{5}</think> \boxed{7} or 8", "7", 0.1, "7"),  # a hedge after </think> still is one
    (r"<think>\boxed{7}</think> So it is 7.", "7", 1.0, "7"),  # no box after </think>: the last box
    (r"<think>\boxed{5} \boxed{7}</think> So it is 7.", "7", 0.1, "7"),  # ... and then its hedge rules
    # an explicit self-correction retracts the boxes before it; the last box is final
    (r"\boxed{5}. Wait, that is wrong, the correct answer is \boxed{7}", "7", 1.0, "7"),
    (r"\boxed{5}. Wait, that is wrong, the correct answer is \boxed{7}", "5", 0.1, "7"),
    (r"\boxed{5}. I made a mistake above: \boxed{7}", "7", 1.0, "7"),
    (r"\boxed{5}, which is incorrect. \boxed{7} or 8", "7", 0.1, "7"),  # hedged after the correction
    (r"\boxed{5}, that was wrong. \boxed{7} \boxed{8}", "8", 0.1, "8"),  # two answers after it
    (r"\boxed{5} that is wrong \boxed{7} hmm \boxed{5}", "5", 0.1, "5"),  # a hedge after the correction
    # an exact irrational reference wants an exact answer; a decimal reference keeps the tolerance
    (r"\boxed{6.928}", r"4\sqrt{3}", 0.1, "6.928"),
    (r"\boxed{6.9282}", r"4\sqrt{3}", 0.1, "6.9282"),
    (r"\boxed{6.283}", r"2\pi", 0.1, "6.283"),
    (r"\boxed{\sqrt{48}}", r"4\sqrt{3}", 1.0, r"\sqrt{48}"),
    (r"\boxed{2\sqrt{12}}", r"4\sqrt{3}", 1.0, r"2\sqrt{12}"),
    (r"\boxed{0.5\sqrt{3}}", r"\frac{\sqrt{3}}{2}", 1.0, r"0.5\sqrt{3}"),
    (r"\boxed{3.464x}", r"2\sqrt{3}x", 0.1, "3.464x"),
    (r"\boxed{\sqrt{12}x}", r"2\sqrt{3}x", 1.0, r"\sqrt{12}x"),
    (r"\boxed{6.93}", "6.93", 1.0, "6.93"),
    (r"\boxed{4\sqrt{3}}", "6.9282032", 1.0, r"4\sqrt{3}"),
    (r"\boxed{2}", r"\sqrt{4}", 1.0, "2"),  # a rational root is no irrational reference
    (r"\boxed{0.5}", r"\sqrt{\frac{1}{4}}", 1.0, "0.5"),
]


@pytest.mark.parametrize(("response", "reference", "reward", "extracted"), CASES)
def test_table(response, reference, reward, extracted):
    res = score(response, reference)
    assert isinstance(res, ScoreResult)
    assert res.extracted == extracted
    assert res.reward == reward
    assert res.format_ok is (extracted is not None)
    assert res.accuracy == (1.0 if reward == 1.0 else 0.0)


def test_weights_and_tolerances():
    assert score(r"\boxed{7}", "7", format_weight=0.0).reward == 1.0
    assert score(r"\boxed{8}", "7", format_weight=0.0).reward == 0.0
    assert score(r"\boxed{8}", "7", format_weight=0.5).reward == 0.5
    assert score(r"\boxed{0.33}", "1/3").accuracy == 0.0
    assert score(r"\boxed{0.33}", "1/3", rel_tol=0.02).accuracy == 1.0
    with pytest.raises(ValueError):
        score(r"\boxed{7}", "7", format_weight=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        score(r"\boxed{7}", "7").reward = 0.0  # frozen


@pytest.mark.parametrize(("text", "value"), [
    ("7", 7.0), ("-3", -3.0), ("+4", 4.0), ("1,000", 1000.0), ("1,234,567.5", 1234567.5), (".5", 0.5),
    ("3/4", 0.75), (r"\frac12", 0.5), (r"\frac{1}{2}", 0.5), (r"\sqrt{2}", 2 ** 0.5), (r"\sqrt[3]{-8}", -2.0),
    (r"3\sqrt{2}", 3 * 2 ** 0.5), (r"2 \cdot 3", 6.0), (r"2\times 3", 6.0), ("2^{10}", 1024.0), ("2^{-1}", 0.5),
    (r"\pi", 3.141592653589793), ("pi", 3.141592653589793), ("sqrt(4)", 2.0), ("(1+2)*3", 9.0),
    ("5 cm^2", 5.0), (r"5\text{ cm}^{2}", 5.0), ("−2", -2.0), (r"\$5", 5.0),
])
def test_parse_number_forms(text, value):
    assert parse_number(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text", [
    "", "B", "2x", "(1,2)", "1,2", "2 3", "1/0", r"\sqrt{-1}", "2^{65}", "2^{1.5}", "9**9", r"9^{9^{9}}",
    "1" * 150, "{" * 40 + "7" + "}" * 40, "-" * 60 + "7", r"\frac{1}", r"\sqrt[99]{2}", "nan", "inf", "1e5",
    "٣", "7" + "\x00", r"\frac1,000",
])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_helpers():
    assert extract_answer(r"a \boxed{\frac{1}{2}} b") == r"\frac{1}{2}"
    assert extract_answer("<answer>x</answer> and <answer> y </answer>") == "y"
    assert answers_match("(B)", r"\text{B}")
    assert not answers_match("A", "B")


# --- hostile input --------------------------------------------------------------------------------------

CANARY = Path("/tmp/pwned_saei")
MB = 1_000_000

HOSTILE = {
    "python_injection": r"\boxed{__import__('os').system('touch /tmp/pwned_saei')}",
    "python_injection_tags": "<answer>__import__('os').system('touch /tmp/pwned_saei')</answer>",
    "power_tower": r"\boxed{9**9**9**9}",
    "latex_power_tower": r"\boxed{9^{9^{9^{9}}}}",
    "huge_exponent": r"\boxed{10^{100000}}",
    "long_plain": "x" * 100_000,
    "long_spaces_then_box": r"\boxed" + " " * 100_000 + "{7",
    "nested_braces": r"\boxed{" + "{" * 100_000 + "7" + "}" * 100_000 + "}",
    "nested_braces_in_window": r"\boxed{" + "{" * 1500 + "8" + "}" * 1500 + "}",
    "nested_sqrt_in_window": r"\boxed{" + r"\sqrt{" * 500 + "7" + "}" * 501,
    "frac_repeats": r"\boxed{" + r"\frac{" * 100_000 + "7",
    "frac_repeats_closed": r"\boxed{" + r"\frac{1}{" * 20 + "7" + "}" * 21,
    "open_boxes": r"\boxed{" * 100_000,
    "open_tags": "<answer>" * 50_000,
    "close_tags": "</answer>" * 50_000,
    "megabyte_digits": r"\boxed{" + "1" * MB + "}",
    "megabyte_digits_tail": "1" * MB + r"\boxed{" + "9" * 150 + "}",
    "commas": r"\boxed{" + "1," * 99 + "}",
    "comma_groups": r"\boxed{" + "1" + ",000" * 49 + "}",
    "text_cmds": r"\boxed{" + r"\text{" * 30_000 + "}",
    "text_cmds_window": r"\boxed{" + r"\text{a " * 400 + "}" * 401,
    "degrees": r"\boxed{" + r"^\circ ^{ \circ" * 10_000 + "}",
    "backslashes": r"\boxed{" + "\\" * 100_000 + "}",
    "nul_bytes": "\x00" * 10_000 + "\\boxed{\x007\x00}",
    "unicode_digits": "\\boxed{७}",
    "unicode_mix": "\\boxed{" + "π√−×·÷°" * 5_000 + "}",
    "rtl_emoji": "\\boxed{\u202e7\U0001f600}",
    "surrogate_like": "\\boxed{\udcff}",
    "minus_run": r"\boxed{" + "-" * 190 + "7}",
    "unary_window": r"\boxed{" + "-" * 3000 + "7}",
    "many_boxes": r"\boxed{7}" * 2000,
    "hedge_run": r"\boxed{7} or " * 1000,
    "or_run": r"\boxed{" + r"7 \text{ or } " * 400 + "}",
    "equality_chain": r"\boxed{x = " + "= ".join(["7"] * 500) + "}",
    "paren_run": r"\boxed{" + "(" * 100 + "7" + ")" * 99 + "}",
    "variable_huge_exponent": r"\boxed{x^{99999999}}",
    "variable_power_tower": r"\boxed{x^{x^{x^{x}}}}",
    "variable_polynomial": r"\boxed{" + "+".join(f"x^{{{k}}}" for k in range(1, 60)) + "}",
    "retractions": r"\boxed{8} that is wrong " * 400,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_bounded(name):
    CANARY.unlink(missing_ok=True)
    res = score(HOSTILE[name], "7")  # its cost, against a normal answer's: bench/rewards.py
    assert isinstance(res, ScoreResult)
    assert res.accuracy == 0.0
    assert res.reward in (0.0, 0.1)
    assert not CANARY.exists()


def test_hostile_reference_side_and_helpers():
    big = r"\text{" * 50_000 + "1," * 50_000
    assert score(big, big).extracted is None
    assert not answers_match(big, "7")
    assert parse_number(big) is None and expression_values(big) is None
    assert score(r"\boxed{7}", "7" * MB).accuracy == 0.0
    assert extract_answer("\\boxed{" * MB) is None


def test_long_response_with_answer_at_end():
    res = score("x" * 100_000 + r" \boxed{7}", "7")
    assert (res.reward, res.extracted) == (1.0, "7")
    # an answer before the scanned window is not seen
    res = score(r"\boxed{7}" + "x" * 100_000, "7")
    assert res.extracted is None


def test_eval_exec_compile_never_called(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("eval/exec/compile called")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    monkeypatch.setattr(builtins, "compile", boom)
    responses = [c[0] for c in CASES] + list(HOSTILE.values())
    results = [score(r, "7") for r in responses]
    results += [score(r, ref) for r, ref, _, _ in CASES]
    assert all(isinstance(r, ScoreResult) for r in results)
    assert not CANARY.exists()


@pytest.mark.parametrize("module", [rewards, answers, answer_match, latex_math], ids=lambda m: m.__name__)
def test_source_has_no_evaluators(module):
    # Static guard: the grader's modules call no evaluator and import no sympy-based parser.
    tree = ast.parse(inspect.getsource(module))
    banned_calls = {"eval", "exec", "compile", "sympify", "parse_expr", "literal_eval", "parse_latex", "__import__"}
    banned_modules = {"sympy", "latex2sympy", "latex2sympy2", "math_verify", "importlib"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            # re.compile builds the module's own constant patterns, not model text
            if name == "compile" and isinstance(f, ast.Attribute) and getattr(f.value, "id", None) == "re":
                continue
            assert name not in banned_calls, name
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names if n} & banned_modules


@pytest.mark.parametrize("text", [
    "x^{99999999}", "x^{x}", "x^{1.5}", r"x^{9^{9}}", "2^{99999999}x", "(x+1)^{65}", "1/(x-x)", "xy + 1", "",
    "x" + "+x" * 150,
])
def test_expression_values_reject(text):
    assert expression_values(text) is None


def test_expression_values_read_letters_as_variables():
    two_x_plus_3 = expression_values("2x+3")
    assert two_x_plus_3 is not None and len(two_x_plus_3) == N_POINTS
    assert len(set(two_x_plus_3)) == N_POINTS  # the points differ, so `2x+3` is no constant
    assert expression_values("3 + 2x") == pytest.approx(two_x_plus_3, rel=1e-12)
    assert expression_values("7") == (7.0,) * N_POINTS
    x, y = expression_values("x"), expression_values("y")
    assert all(a != b for a, b in zip(x, y))  # letters get distinct values
    assert expression_values("X") != x  # and case matters (text comparison lower-cases choices)
    assert parse_number("2x+3") is None  # a number needs no letters


def test_bench_smoke(capsys):
    ratios = rewards_bench.main(["--repeats", "1", "--scale", "0.001"])
    assert set(ratios) == set(rewards_bench.hostile_inputs(0.001))
    assert all(r > 0 for r in ratios.values())
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("worst_vs_normal_ratio=") and out[-1].startswith("normal_score_us=")
