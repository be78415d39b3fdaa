"""The embedded visual-reasoning task: small PIL-rendered figures whose answers need the image.

Six families, each with a difficulty knob (0 = easiest):
- `count`:  shapes of several colours; "how many <colour> shapes?"            answer: an integer
- `total`:  shapes of several colours; the red and the blue ones together       answer: a sum of two counts
- `more`:   shapes of several colours; by how many red outnumber blue           answer: a difference of counts
- `arith`:  two numbers drawn in the figure; their sum or difference          answer: an integer
- `angle`:  a triangle with two angles labelled; the third angle              answer: degrees
- `pythag`: a right triangle with two sides labelled; the third side          answer: integer or \\sqrt{n}

The embedded default trains on count, total and more: the tiny vision tower perceives coloured shapes
(one shape per merged image token) within the bootstrap's minutes, and total / more put a reasoning
step (count two colours, then add or subtract) on top, which the bootstrapped policy gets only
sometimes right: room for RL. The tiny tower does not learn to read drawn digits in that budget
(arith, angle and pythag stay near their text prior; see the README), so those are for larger policies.

The question text never holds the numbers: only the image does, so a policy that ignores the image
cannot beat chance. Example i of a split depends only on (seed, split, i), never on how many examples
are made. Files are written in the geometry3k schema that EasyR1 and verl read: `images` (a list of
{bytes, path}), `problem` (with `<image>`), `answer`, plus `solution` (a short worked answer ending in
\\boxed{}, used by the supervised bootstrap) and `family`.
"""

from __future__ import annotations

import io
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

FAMILIES = ("count", "total", "more", "arith", "angle", "pythag")

COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (30, 160, 60),
    "yellow": (230, 190, 20),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle")

# Right triangles with integer legs; difficulty >= 2 also asks for legs that give \sqrt{n}.
_TRIPLES = [(3, 4, 5), (6, 8, 10), (5, 12, 13), (8, 15, 17), (9, 12, 15), (7, 24, 25), (12, 16, 20), (20, 21, 29)]


@dataclass
class Example:
    """One synthetic task instance before it is written to a file."""

    family: str
    """Which family made it (one of FAMILIES)."""
    problem: str
    """Question text starting with `<image>`."""
    answer: str
    """Reference answer (an integer as text, or `\\sqrt{n}` / `k\\sqrt{n}`)."""
    solution: str
    """A short worked solution ending in `\\boxed{answer}`."""
    image: Image.Image
    """The rendered RGB figure."""


def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled font: the same glyphs on every machine, no system fonts needed.
    return ImageFont.load_default(size=size)


def _centred_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int, fill=(0, 0, 0)) -> None:
    draw.text(xy, text, fill=fill, font=_font(size), anchor="mm")


def _place_shapes(rng: random.Random, size: int, counts: dict[str, int]) -> tuple[Image.Image, dict[str, int]]:
    """White figure with counts[c] shapes of colour c (in dict order); returns it and what was placed."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    # One shape per 28-pixel cell: a cell is exactly one merged image token of Qwen2-VL (patch 14,
    # merge 2), so a tiny vision tower can learn counting in minutes; a little jitter inside the cell.
    cell = 28
    r = 10
    cells = [(i, j) for i in range(size // cell) for j in range(size // cell)]
    rng.shuffle(cells)
    placed = {c: 0 for c in counts}
    for c, k in counts.items():
        for _ in range(k):
            if not cells:
                break
            i, j = cells.pop()
            cx = i * cell + cell / 2 + rng.uniform(-2, 2)
            cy = j * cell + cell / 2 + rng.uniform(-2, 2)
            shape = rng.choice(SHAPES)
            box = (cx - r, cy - r, cx + r, cy + r)
            if shape == "circle":
                draw.ellipse(box, fill=COLOURS[c])
            elif shape == "square":
                draw.rectangle(box, fill=COLOURS[c])
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[c])
            placed[c] += 1
    return img, placed


def _shapes(n: int, colour: str) -> str:
    return f"{n} {colour} shape{'' if n == 1 else 's'}"


def _count(rng: random.Random, size: int, difficulty: int) -> Example:
    # Difficulty 0 draws only the asked colour (count what is there); each level adds a distractor.
    colours = rng.sample(list(COLOURS), min(1 + difficulty, len(COLOURS)))
    target = colours[0]
    max_each = 4 + difficulty
    img, placed = _place_shapes(rng, size, {c: rng.randint(0 if c != target else 1, max_each) for c in colours})
    n = placed[target]
    problem = f"<image>How many {target} shapes are in the figure?"
    solution = f"There {'is' if n == 1 else 'are'} {_shapes(n, target)}. \\boxed{{{n}}}"
    return Example("count", problem, str(n), solution, img)


def _total(rng: random.Random, size: int, difficulty: int) -> Example:
    # Two colours to count and add; each difficulty level adds a distractor colour.
    colours = rng.sample(list(COLOURS), min(2 + difficulty, len(COLOURS)))
    a, b = colours[:2]
    max_each = 4 + difficulty
    img, placed = _place_shapes(rng, size, {c: rng.randint(1 if c in (a, b) else 0, max_each) for c in colours})
    na, nb = placed[a], placed[b]
    problem = f"<image>Count the {a} shapes and the {b} shapes together. How many are there?"
    solution = f"{_shapes(na, a)} and {_shapes(nb, b)}: {na} + {nb} = {na + nb}. \\boxed{{{na + nb}}}"
    return Example("total", problem, str(na + nb), solution, img)


def _more(rng: random.Random, size: int, difficulty: int) -> Example:
    # Two colours to count and subtract (the first always outnumbers the second); distractors as above.
    colours = rng.sample(list(COLOURS), min(2 + difficulty, len(COLOURS)))
    a, b = colours[:2]
    max_each = 4 + difficulty
    nb = rng.randint(0, max_each - 1)
    counts = {a: rng.randint(nb + 1, max_each), b: nb}
    counts.update({c: rng.randint(0, max_each) for c in colours[2:]})
    img, placed = _place_shapes(rng, size, counts)  # a and b come first: always placed in full
    na, nb = placed[a], placed[b]
    problem = f"<image>By how many do the {a} shapes outnumber the {b} shapes?"
    solution = f"{_shapes(na, a)} and {_shapes(nb, b)}: {na} - {nb} = {na - nb}. \\boxed{{{na - nb}}}"
    return Example("more", problem, str(na - nb), solution, img)


def _arith(rng: random.Random, size: int, difficulty: int) -> Example:
    hi = (9, 20, 50, 99)[min(difficulty, 3)]
    a, b = rng.randint(1, hi), rng.randint(1, hi)
    op = "+" if difficulty == 0 else rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    fs = int(size / 3 * rng.uniform(0.85, 1.1))
    j = lambda: rng.uniform(-0.07, 0.07) * size  # noqa: E731  layout jitter: no two figures alike
    _centred_text(draw, (size * 0.3 + j(), size * 0.3 + j()), str(a), fs, fill=(20, 20, 160))
    _centred_text(draw, (size * 0.7 + j(), size * 0.7 + j()), str(b), fs, fill=(160, 20, 20))
    verb = "sum" if op == "+" else "difference (larger minus smaller)"
    problem = f"<image>What is the {verb} of the two numbers in the figure?"
    solution = f"{a} {op} {b} = {value}. \\boxed{{{value}}}"
    return Example("arith", problem, str(value), solution, img)


def _angle(rng: random.Random, size: int, difficulty: int) -> Example:
    step = (10, 5, 1, 1)[min(difficulty, 3)]
    a = rng.randrange(30, 91, step)
    b = rng.randrange(30, min(120, 160 - a) + 1, step)  # x >= 20: thinner triangles are illegible
    c = 180 - a - b
    # The triangle with its true angles (law of sines), scaled and centred to fit the canvas.
    ra, rb = math.radians(a), math.radians(b)
    d = math.sin(rb) / math.sin(ra + rb)  # |AC| for |AB| = 1
    pts = [(0.0, 0.0), (1.0, 0.0), (d * math.cos(ra), d * math.sin(ra))]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    m = size * rng.uniform(0.06, 0.14)
    k = (size - 2 * m) / max(max(xs) - min(xs), max(ys) - min(ys))
    shift = m * 0.8  # translation jitter inside the margin
    ox = (size - k * (max(xs) - min(xs))) / 2 - k * min(xs) + rng.uniform(-shift, shift)
    oy = (size + k * (max(ys) - min(ys))) / 2 + k * min(ys) + rng.uniform(-shift, shift)
    A, B, C = [(ox + k * px, oy - k * py) for px, py in pts]
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.polygon([A, B, C], outline=(0, 0, 0), width=2)
    fs = max(10, int(size / 8 * rng.uniform(0.9, 1.1)))
    g = ((A[0] + B[0] + C[0]) / 3, (A[1] + B[1] + C[1]) / 3)
    for v, label in ((A, f"{a}°"), (B, f"{b}°"), (C, "x")):
        dx, dy = g[0] - v[0], g[1] - v[1]
        n = math.hypot(dx, dy) or 1.0
        t = min(fs * 1.3, 0.6 * n)  # inside the corner, never past the centroid
        _centred_text(draw, (v[0] + dx / n * t, v[1] + dy / n * t), label, fs)
    problem = "<image>Two angles of the triangle are labelled. Find the angle x in degrees."
    solution = f"x = 180 - {a} - {b} = {c}. \\boxed{{{c}}}"
    return Example("angle", problem, str(c), solution, img)


def _pythag(rng: random.Random, size: int, difficulty: int) -> Example:
    if difficulty >= 2 and rng.random() < 0.5:
        p, q = rng.randint(1, 9), rng.randint(1, 9)
        hyp2 = p * p + q * q
        root = math.isqrt(hyp2)
        legs, ask_hyp = (p, q), True
        answer = str(root) if root * root == hyp2 else f"\\sqrt{{{hyp2}}}"
    else:
        p, q, r = rng.choice(_TRIPLES[: 3 + 2 * min(difficulty, 2)])
        legs, ask_hyp = (p, q), rng.random() < 0.5
        answer = str(r) if ask_hyp else str(q)
    p, q = legs
    m = size * 0.15
    w, h = (size - 2 * m) * rng.uniform(0.6, 1.0), (size - 2 * m) * rng.uniform(0.6, 1.0)
    # Right angle at bottom-left; the drawing is schematic (not to scale), as geometry3k figures are.
    dx, dy = rng.uniform(0, size - 2 * m - w), rng.uniform(-(size - 2 * m - h), 0)
    A, B, C = (m + dx, size - m + dy), (m + dx + w, size - m + dy), (m + dx, size - m - h + dy)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.polygon([A, B, C], outline=(0, 0, 0), width=2)
    k = size * 0.06
    draw.line([(A[0] + k, A[1]), (A[0] + k, A[1] - k), (A[0], A[1] - k)], fill=(0, 0, 0), width=1)
    fs = max(10, size // 7)
    if ask_hyp:
        _centred_text(draw, ((A[0] + B[0]) / 2, A[1] + fs * 0.55), str(p), fs)
        _centred_text(draw, (A[0] - fs * 0.55, (A[1] + C[1]) / 2), str(q), fs)
        _centred_text(draw, ((B[0] + C[0]) / 2 + fs * 0.6, (B[1] + C[1]) / 2 - fs * 0.4), "x", fs)
        solution = f"x = \\sqrt{{{p}^2 + {q}^2}} = {answer}. \\boxed{{{answer}}}"
    else:
        r = math.isqrt(p * p + q * q)
        _centred_text(draw, ((A[0] + B[0]) / 2, A[1] + fs * 0.55), str(p), fs)
        _centred_text(draw, (A[0] - fs * 0.55, (A[1] + C[1]) / 2), "x", fs)
        _centred_text(draw, ((B[0] + C[0]) / 2 + fs * 0.6, (B[1] + C[1]) / 2 - fs * 0.4), str(r), fs)
        solution = f"x = \\sqrt{{{r}^2 - {p}^2}} = {answer}. \\boxed{{{answer}}}"
    problem = "<image>The triangle has a right angle. Find the side x."
    return Example("pythag", problem, answer, solution, img)


_MAKERS = {"count": _count, "total": _total, "more": _more, "arith": _arith, "angle": _angle, "pythag": _pythag}
_SPLIT_SALT = {"train": 0, "test": 1}


def make_example(index: int, *, seed: int = 0, split: str = "train", families: tuple[str, ...] = FAMILIES,
                 difficulty: int = 0, image_size: int = 112) -> Example:
    """Example `index` of a split: a function of its arguments alone (deterministic, order-free)."""
    bad = [f for f in families if f not in _MAKERS]
    if bad or not families:
        raise ValueError(f"unknown synthetic families {bad or families}; choose from {FAMILIES}")
    if split not in _SPLIT_SALT:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if image_size % 28 or image_size < 56:
        raise ValueError(f"image_size must be a multiple of 28 and >= 56, got {image_size}")
    rng = random.Random(f"saei-synthetic/{seed}/{split}/{index}")
    family = families[index % len(families)]
    return _MAKERS[family](rng, image_size, difficulty)


def corpus_texts(seed: int = 0, n: int = 1500) -> list[str]:
    """Text the tiny tokenizer is trained on: prompts, solutions and the chat scaffolding."""
    texts = []
    for i in range(n):
        for split in ("train", "test"):
            ex = make_example(i, seed=seed, split=split, difficulty=i % 4, image_size=56)
            texts += [ex.problem, ex.solution, ex.answer]
    texts += [str(i) for i in range(1000)]
    texts += ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "Picture 1: ",
              "Put the final answer in \\boxed{}.", "<answer></answer>", "\\frac{}{}", "\\sqrt{}", "^\\circ"]
    return texts


_RESULT = re.compile(r"= (-?\d+)\. \\boxed\{(-?\d+)\}$")


def slipped_solution(solution: str, family: str | None) -> str:
    """The worked solution with the reasoning step's slip: the result of `total` / `more` one too high.

    The supervised bootstrap shows this slip in a share of its demonstrations (BootstrapSettings.slip_rate)
    so that the bootstrapped policy carries a systematic reasoning error that only a reward can reveal:
    its greedy answer is often the slipped one while sampling still finds the right one. The data files
    are never changed; other families and unrecognised solutions come back as they are.
    """
    m = _RESULT.search(solution)
    if family not in ("total", "more") or m is None or m.group(1) != m.group(2):
        return solution
    wrong = int(m.group(1)) + 1
    return solution[:m.start()] + f"= {wrong}. \\boxed{{{wrong}}}"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_split(path: str | Path, n: int, *, seed: int = 0, split: str = "train",
                families: tuple[str, ...] = FAMILIES, difficulty: int = 0, image_size: int = 112) -> Path:
    """Write `n` examples of `split` as one geometry3k-schema parquet file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {"images": [], "problem": [], "answer": [], "solution": [], "family": []}
    for i in range(n):
        ex = make_example(i, seed=seed, split=split, families=families, difficulty=difficulty,
                          image_size=image_size)
        rows["images"].append([{"bytes": _png(ex.image), "path": ""}])
        rows["problem"].append(ex.problem)
        rows["answer"].append(ex.answer)
        rows["solution"].append(ex.solution)
        rows["family"].append(ex.family)
    schema = pa.schema([
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("solution", pa.string()),
        ("family", pa.string()),
    ])
    pq.write_table(pa.table(rows, schema=schema), path)
    return path


def write_dataset(out_dir: str | Path, *, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                  families: tuple[str, ...] = FAMILIES, difficulty: int = 0,
                  image_size: int = 112) -> tuple[Path, Path]:
    """Write `train.parquet` and `test.parquet` under `out_dir`; returns their paths."""
    out = Path(out_dir)
    kw = dict(seed=seed, families=families, difficulty=difficulty, image_size=image_size)
    return (write_split(out / "train.parquet", n_train, split="train", **kw),
            write_split(out / "test.parquet", n_test, split="test", **kw))


_QUESTION_FAMILY = {"How many ": "count", "Count the ": "total", "By how many ": "more", "What is the ": "arith", "Two angles ": "angle", "The triangle has a right": "pythag"}


def family_of(problem: str) -> str | None:
    """The family whose question this is, or None for a problem not made here."""
    text = problem.replace("<image>", "", 1)
    return next((fam for start, fam in _QUESTION_FAMILY.items() if text.startswith(start)), None)
