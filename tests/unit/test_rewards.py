import ast
import builtins
import dataclasses
import inspect
import time
from pathlib import Path

import pytest

from core import rewards
from core.rewards import ScoreResult, answers_match, extract_answer, parse_number, score

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
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_bounded(name):
    CANARY.unlink(missing_ok=True)
    response = HOSTILE[name]
    t0 = time.perf_counter()
    res = score(response, "7")
    elapsed = time.perf_counter() - t0
    assert isinstance(res, ScoreResult)
    assert elapsed < 0.1, f"{name} took {elapsed:.3f}s"  # the bound per call; measured <= 3 ms
    assert res.accuracy == 0.0
    assert res.reward in (0.0, 0.1)
    assert not CANARY.exists()


def test_hostile_reference_side_and_helpers_bounded():
    big = r"\text{" * 50_000 + "1," * 50_000
    for fn in (lambda: score(big, big), lambda: answers_match(big, "7"), lambda: parse_number(big),
               lambda: score(r"\boxed{7}", "7" * MB), lambda: extract_answer("\\boxed{" * MB)):
        t0 = time.perf_counter()
        fn()
        assert time.perf_counter() - t0 < 1.0


def test_long_response_with_answer_at_end():
    res = score("x" * 100_000 + r" \boxed{7}", "7")
    assert (res.reward, res.extracted) == (1.0, "7")
    # an answer before the scanned window is not seen
    res = score(r"\boxed{7}" + "x" * 100_000, "7")
    assert res.extracted is None


def test_typical_score_is_fast():
    response = "Let me think. " * 300 + r"The third angle is 180 - 50 - 60 = 70. \boxed{70^\circ}"
    t0 = time.perf_counter()
    for _ in range(100):
        score(response, "70")
    assert (time.perf_counter() - t0) / 100 < 0.005


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


def test_source_has_no_evaluators():
    # Static guard: the module calls no evaluator and imports no sympy-based parser.
    tree = ast.parse(inspect.getsource(rewards))
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
