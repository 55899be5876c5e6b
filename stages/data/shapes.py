"""The built-in synthetic benchmark "shapes": coloured shapes on a noisy background, four tasks.

Every sample is a pure function of (seed, split, index): the image from one random stream, the task text from
another, so the same image underlies a caption, a question, a referring expression and a hypothesis. Splits use
different streams and never share images.

Objects carry (size, colour, shape); no two objects of an image share (colour, shape), so "the red circle" always
names one object. Captions list every object as "[a] <size> <colour> <shape>" in free order and wording (the
multimodality that knowledge distillation removes); `parse_caption` reads the objects back for exact-set scoring.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from stages.data.schema import task_prompt

GENERATOR_VERSION = 3  # 3: VQA annotators disagree by synonyms / near answers; entailment yes/no need the image
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
RGB = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 230), "yellow": (240, 220, 20),
       "purple": (150, 40, 190), "orange": (250, 140, 10)}
SIZE_FRACTION = {"small": 0.17, "large": 0.29}  # object side / image side
MAX_CAPTION_WORDS = 16  # words + commas, so a caption + EOS fits 17 queries
MAX_ANSWER_WORDS = 3
# Longest target (words / tokens) per task, plus EOS. Q-CTC needs num_queries >= target length + repeats; BPE may
# split a word, so the real check also runs on the tokenised training split (train_nar counts infeasible targets).
SHAPES_MIN_QUERIES: dict[str, int] = {"caption": MAX_CAPTION_WORDS + 1, "vqa": MAX_ANSWER_WORDS + 1,
                                      "grounding": 4 + 1, "entailment": 1 + 1}
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
_TASK_CODE = {"caption": 11, "vqa": 12, "grounding": 13, "entailment": 14}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class Obj:
    size: str
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 pixels (x1, y1 exclusive)

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    def triple(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)

    def phrase(self, article: bool = True) -> str:
        words = f"{self.size} {self.colour} {self.shape}"
        return f"a {words}" if article else words


def _rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_CODE)}")
    return np.random.default_rng([seed, _SPLIT_CODE[split], index, stream])


# ---- scene and image ----------------------------------------------------------------------------------------
def make_scene(seed: int, split: str, index: int, image_size: int, max_objects: int) -> list[Obj]:
    """1..max_objects non-overlapping objects, distinct (colour, shape) each; deterministic."""
    rng = _rng(seed, split, index)
    n = int(rng.integers(1, max_objects + 1))
    objs: list[Obj] = []
    used: set[tuple[str, str]] = set()
    gap = max(1, image_size // 32)
    attempts = 0
    while len(objs) < n:
        attempts += 1
        size = SIZES[int(rng.integers(2))] if attempts < 200 else "small"
        colour, shape = COLOURS[int(rng.integers(6))], SHAPES[int(rng.integers(6))]
        if (colour, shape) in used:
            continue
        side = max(6, int(round(SIZE_FRACTION[size] * image_size)))
        x0, y0 = (int(v) for v in rng.integers(1, image_size - side, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if any(box[0] < o.box[2] + gap and o.box[0] < box[2] + gap and box[1] < o.box[3] + gap
               and o.box[1] < box[3] + gap for o in objs):
            if attempts > 1000:  # crowded: keep what fits
                break
            continue
        used.add((colour, shape))
        objs.append(Obj(size, colour, shape, box))
    return objs


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    w, h = x1 - x0 - 1, y1 - y0 - 1
    cx, cy = x0 + w / 2, y0 + h / 2
    if shape == "triangle":
        return [(cx, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    if shape == "diamond":
        return [(cx, y0), (x0 + w, cy), (cx, y0 + h), (x0, cy)]
    if shape == "cross":
        t = w / 6
        return [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x0 + w, cy - t), (x0 + w, cy + t), (cx + t, cy + t),
                (cx + t, y0 + h), (cx - t, y0 + h), (cx - t, cy + t), (x0, cy + t), (x0, cy - t), (cx - t, cy - t)]
    if shape == "star":
        pts = []
        for i in range(10):
            r = (w / 2) if i % 2 == 0 else (w / 5)
            a = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
        return pts
    raise ValueError(shape)


def render(objs: list[Obj], image_size: int, seed: int, split: str, index: int) -> bytes:
    """PNG bytes of the scene: a noisy grey background, each object filled in its colour."""
    rng = _rng(seed, split, index, stream=1)
    base = rng.integers(70, 170, size=3)
    noise = rng.normal(0, 14, size=(image_size, image_size, 3))
    bg = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for o in objs:
        colour = tuple(int(c) for c in np.clip(np.array(RGB[o.colour]) + rng.integers(-15, 16, size=3), 0, 255))
        x0, y0, x1, y1 = o.box
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        else:
            draw.polygon(_polygon(o.shape, o.box), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---- captions -----------------------------------------------------------------------------------------------
def _join(phrases: list[str], style: int) -> str:
    if len(phrases) == 1:
        return phrases[0]
    head, last = phrases[:-1], phrases[-1]
    if style == 0:
        return ", ".join(head) + " and " + last
    if style == 1:
        return " and ".join(phrases)
    if style == 2:
        return ", ".join(head) + " as well as " + last
    return " with ".join(phrases) if len(phrases) == 2 else ", ".join(head) + " with " + last


def _length(text: str) -> int:
    """Words plus commas: the caption's length in word-level tokens (BPE makes each comma a token)."""
    return len(text.split()) + text.count(",")


_PREFIXES = ("there {be} ", "we see ", "an image of ", "a picture showing ", "", "this shows ", "", "showing ")
_SUFFIXES = ("", "", "", "", " on a noisy background", "", "", "")


def _caption_orders(objs: list[Obj], rng: np.random.Generator, k: int) -> list[list[Obj]]:
    """Object order of each of k captions: left to right half the time, else random; never all the same."""
    n = len(objs)
    left_to_right = sorted(objs, key=lambda o: (o.cx, o.cy))
    orders = [left_to_right if rng.random() < 0.5 else [objs[i] for i in rng.permutation(n)] for _ in range(k)]
    if n > 1 and k > 1 and all(o == orders[0] for o in orders):
        j = int(rng.integers(1, k))  # never 0: orders[0] is the one the others must differ from
        for _ in range(100):  # identical-looking objects can make every permutation equal: give up then
            orders[j] = [objs[i] for i in rng.permutation(n)]
            if orders[j] != orders[0]:
                break
    return orders


def caption_variants(objs: list[Obj], rng: np.random.Generator, k: int = 5) -> list[str]:
    """k distinct captions of the scene (<= MAX_CAPTION_WORDS words + commas), differing in order and wording."""
    n = len(objs)
    be = "is" if n == 1 else "are"
    out: list[str] = []
    for order in _caption_orders(objs, rng, k):
        for _ in range(200):
            template = int(rng.integers(len(_PREFIXES)))
            style = int(rng.integers(4))
            article = bool(rng.random() < 0.6)
            text = _PREFIXES[template].replace("{be}", be)
            text += _join([o.phrase(article) for o in order], style) + _SUFFIXES[template]
            if _length(text) > MAX_CAPTION_WORDS and article:
                text = _PREFIXES[template].replace("{be}", be)
                text += _join([o.phrase(False) for o in order], style) + _SUFFIXES[template]
            if _length(text) <= MAX_CAPTION_WORDS and text not in out:
                out.append(text)
                break
    return out


_WORD = re.compile(r"[a-z]+")
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + ("es" if s == "cross" else "s"): s for s in SHAPES}}


def task_fields(task: str, objs: list[Obj], rng: np.random.Generator, label_index: int, image_size: int,
                max_objects: int) -> dict:
    """The task's fields of one sample over the scene `objs` (references / question + answers + meta / expression +
    box + meta / premise + hypothesis + label + meta); `label_index` % 3 picks the entailment label."""
    if task == "caption":
        return {"references": caption_variants(objs, rng, k=5)}
    if task == "vqa":
        return vqa_item(objs, rng, image_size)
    if task == "grounding":
        return grounding_item(objs, rng, image_size)
    if task == "entailment":
        return entailment_item(objs, rng, label_index, image_size, max_objects)
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(_TASK_CODE)}")


def scene_sample(task: str, objects: list[list], image_size: int, rng: np.random.Generator, max_objects: int = 4
                 ) -> dict:
    """A fresh sample of `task` over a scene given as meta.objects rows [size, colour, shape, x0, y0, x1, y1]:
    its task fields (references / question + answers / expression + box / premise + hypothesis + label), "task"
    and "image_size", drawn as the generator draws them (no image, id or prompt)."""
    objs = [Obj(str(r[0]), str(r[1]), str(r[2]), tuple(int(v) for v in r[3:7])) for r in objects]
    fields = task_fields(task, objs, rng, int(rng.integers(3)), image_size, max_objects)
    fields.pop("meta", None)
    return {"task": task, "image_size": [image_size, image_size], **fields}


def parse_caption(text: str) -> set[tuple[str, str, str]]:
    """The objects a caption names: every "<size> <colour> <shape>" word triple, as (size, colour, shape)."""
    words = _WORD.findall(text.lower())
    found = set()
    for i in range(len(words) - 2):
        size, colour, shape = words[i], words[i + 1], _SHAPE_WORDS.get(words[i + 2])
        if size in SIZES and colour in COLOURS and shape is not None:
            found.add((size, colour, shape))
    return found


# ---- VQA ----------------------------------------------------------------------------------------------------
def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(shape: str) -> str:
    return shape + ("es" if shape == "cross" else "s")


# How annotators who do not give the canonical answer disagree (VQA v2's human answers): mostly a synonym or a near
# answer (a neighbouring number, a neighbouring colour, a look-alike shape), rarely something unrelated. On yes/no
# questions nobody gives the opposite answer, so a blind "yes" gets no partial credit on a "no" question.
_SYNONYMS = {
    "yes": ("yeah", "yep", "yes it is"), "no": ("nope", "nah", "no way"),
    "red": ("dark red", "bright red"), "green": ("dark green", "light green"), "blue": ("dark blue", "light blue"),
    "yellow": ("gold", "bright yellow"), "purple": ("violet", "dark purple"), "orange": ("dark orange", "amber"),
    "circle": ("round", "circular"), "square": ("box", "square shape"), "triangle": ("triangular", "triangle shape"),
    "diamond": ("rhombus", "diamond shape"), "cross": ("plus", "plus sign"), "star": ("star shape", "five point star"),
}
_NEAR = {  # neighbours on the colour wheel; shapes that look alike at low resolution
    "red": ("orange", "purple", "pink"), "orange": ("red", "yellow", "brown"), "yellow": ("orange", "green"),
    "green": ("yellow", "blue"), "blue": ("green", "purple"), "purple": ("blue", "red", "pink"),
    "circle": ("oval", "star"), "square": ("rectangle", "diamond"), "triangle": ("diamond", "pyramid"),
    "diamond": ("square", "triangle"), "cross": ("star", "x"), "star": ("cross", "circle"),
}
_UNRELATED = ("not sure", "unknown", "nothing", "shapes", "gray", "black", "white", "background")
P_SYNONYM, P_NEAR = 0.45, 0.4  # of a disagreeing annotator; the rest (0.15) answer something unrelated


def _annotate(answer: str, synonyms: list[str], near: list[str], rng: np.random.Generator) -> list[str]:
    """10 annotator answers: a strict majority (6..9) of `answer`; each other annotator gives a synonym (p 0.45), a
    near answer (p 0.4) or an unrelated one (p 0.15), falling back to the next kind when a pool is empty."""
    n_right = int(rng.integers(6, 10))
    rest = []
    for _ in range(10 - n_right):
        u = rng.random()
        pool: list[str] = []
        if u < P_SYNONYM + P_NEAR:
            first, second = (synonyms, near) if u < P_SYNONYM else (near, synonyms)
            pool = first or second
        pool = pool or [w for w in _UNRELATED if w != answer]
        rest.append(pool[int(rng.integers(len(pool)))])
    answers = [answer] * n_right + rest
    return [answers[i] for i in rng.permutation(10)]


ANSWER_TYPES = {"count": "number", "exists": "yes/no", "spatial": "yes/no", "colour": "other", "shape": "other",
                "multi": "other"}  # question type -> VQA v2 answer type


def _left_of(a: Obj, b: Obj, margin: float) -> bool:
    return a.cx < b.cx - margin


def _above(a: Obj, b: Obj, margin: float) -> bool:
    return a.cy < b.cy - margin


def vqa_item(objs: list[Obj], rng: np.random.Generator, image_size: int) -> dict:
    """One question about the scene with 10 answers; meta names the question type and the canonical answer."""
    shape_count = Counter(o.shape for o in objs)
    colour_count = Counter(o.colour for o in objs)
    margin = image_size / 16
    multi = [s for s, c in shape_count.items() if c == 2]
    pairs = [(a, b) for a in objs for b in objs if a is not b
             and (abs(a.cx - b.cx) > margin or abs(a.cy - b.cy) > margin)]
    kinds = ["count", "colour", "shape", "exists"] + (["spatial"] if pairs else []) + (["multi"] if multi else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "count":
        shape = SHAPES[int(rng.integers(6))] if rng.random() < 0.3 else objs[int(rng.integers(len(objs)))].shape
        c = shape_count.get(shape, 0)
        question, answer = f"how many {_plural(shape)} are there?", str(c)
        synonyms = [NUMBER_WORDS[c]] + (["none"] if c == 0 else [])  # the metric maps them to the digit
        near = [str(x) for x in (c - 1, c + 1) if x >= 0]
    elif kind == "colour":
        unique = [o for o in objs if shape_count[o.shape] == 1] or objs
        o = unique[int(rng.integers(len(unique)))]
        ref = o.shape if shape_count[o.shape] == 1 else f"{o.size} {o.shape}"
        if shape_count[o.shape] > 1 and sum(p.shape == o.shape and p.size == o.size for p in objs) > 1:
            kind = "exists"  # no short unique name: ask existence instead
        else:
            question, answer = f"what color is the {ref}?", o.colour
            synonyms, near = list(_SYNONYMS[o.colour]), list(_NEAR[o.colour])
    if kind == "shape":
        unique = [o for o in objs if colour_count[o.colour] == 1]
        if unique:
            o = unique[int(rng.integers(len(unique)))]
            question, answer = f"what shape is the {o.colour} object?", o.shape
            synonyms, near = list(_SYNONYMS[o.shape]), list(_NEAR[o.shape])
        else:
            kind = "exists"
    if kind == "exists":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            colour, shape = sorted(present)[int(rng.integers(len(present)))]
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            colour, shape = absent[int(rng.integers(len(absent)))]
        question = f"is there {_a(colour)} {shape}?"
        answer = "yes" if (colour, shape) in present else "no"
        synonyms, near = list(_SYNONYMS[answer]), []
    elif kind == "spatial":
        a, b = pairs[int(rng.integers(len(pairs)))]
        horizontal = abs(a.cx - b.cx) > margin and (abs(a.cy - b.cy) <= margin or rng.random() < 0.5)
        relation = "left of" if horizontal else "above"
        truth = _left_of(a, b, 0) if horizontal else _above(a, b, 0)
        question = f"is the {a.colour} {a.shape} {relation} the {b.colour} {b.shape}?"
        answer = "yes" if truth else "no"
        synonyms, near = list(_SYNONYMS[answer]), []
    elif kind == "multi":
        shape = multi[int(rng.integers(len(multi)))]
        two = sorted((o for o in objs if o.shape == shape), key=lambda o: (o.cx, o.cy))
        question = f"what colors are the {_plural(shape)}?"
        answer = f"{two[0].colour} and {two[1].colour}"
        synonyms = [f"{two[1].colour} and {two[0].colour}"]
        near = [two[0].colour, two[1].colour]
    answers = _annotate(answer, synonyms, near, rng)
    return {"question": question, "answers": answers,
            "meta": {"question_type": kind, "answer_type": ANSWER_TYPES[kind], "answer": answer}}


# ---- grounding ----------------------------------------------------------------------------------------------
def _matches(o: Obj, size: str | None, colour: str | None, shape: str | None) -> bool:
    return (size is None or o.size == size) and (colour is None or o.colour == colour) and \
        (shape is None or o.shape == shape)


def _noun(size: str | None, colour: str | None, shape: str | None) -> str:
    words = [w for w in (size, colour) if w] + [shape or "object"]
    return " ".join(words)


def referring_expressions(objs: list[Obj], target: Obj, image_size: int) -> list[str]:
    """Every expression of the menu that names `target` and no other object of the scene."""
    out = []
    for size, colour, shape in [(None, None, target.shape), (None, target.colour, None),
                                (target.size, None, target.shape), (None, target.colour, target.shape),
                                (target.size, target.colour, target.shape)]:
        if sum(_matches(o, size, colour, shape) for o in objs) == 1:
            out.append(f"the {_noun(size, colour, shape)}")
    margin = image_size / 16
    relations = {"left of": lambda a, b: a.cx < b.cx, "right of": lambda a, b: a.cx > b.cx,
                 "above": lambda a, b: a.cy < b.cy, "below": lambda a, b: a.cy > b.cy}
    for anchor in objs:
        if anchor is target:
            continue
        for name, rel in relations.items():
            same = [o for o in objs if o is not anchor and o.shape == target.shape and rel(o, anchor)]
            clear = abs(target.cx - anchor.cx) > margin if name in ("left of", "right of") else \
                abs(target.cy - anchor.cy) > margin
            if same == [target] and clear:
                out.append(f"the {target.shape} {name} the {anchor.colour} {anchor.shape}")
    return out


def grounding_item(objs: list[Obj], rng: np.random.Generator, image_size: int) -> dict:
    target = objs[int(rng.integers(len(objs)))]
    exprs = referring_expressions(objs, target, image_size)
    relational = [e for e in exprs if e.count(" the ") >= 1]
    pool = relational if relational and rng.random() < 0.3 else exprs
    expression = pool[int(rng.integers(len(pool)))]
    return {"expression": expression, "box": list(target.box), "meta": {"target": list(target.triple())}}


# ---- entailment ---------------------------------------------------------------------------------------------
_MAYBE = ("the {o} is made of wood", "the {o} is heavy", "the {o} was drawn by a child", "the {o} is spinning",
          "the {o} is someone's favorite", "the {o} is very old", "the {o} is hot", "the {o} belongs to a game")


_GENERIC_PREMISES = ("an image of shapes", "some shapes on a noisy background", "a picture of a few shapes",
                     "shapes on a grey background")
P_COUNT_HYPOTHESIS = 0.25


def _count_hypothesis(n: int) -> str:
    return f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'s' if n > 1 else ''}"


def entailment_item(objs: list[Obj], rng: np.random.Generator, index: int, image_size: int, max_objects: int
                    ) -> dict:
    """A premise and a hypothesis that is true ("yes"), false ("no") or undecidable ("maybe") of the image.

    A yes/no hypothesis is about objects the premise does not name, and everything but its truth is drawn without
    looking at the label, yes and no worded alike: only the image decides it (a text-only reader, premise
    included, is at chance on them; the "maybe" templates are told apart by their text and are not counted as
    image-dependent). The kind is drawn first, then its subject ("focus") objects, then the premise: a caption of
    a random subset of the other objects (none: a generic premise). Kinds: exists ("there is a red circle"; "no"
    names an absent pair), colour ("the circle is red", a shape the scene has once), spatial ("the red circle is
    left of / above the blue star") and count ("there are three objects", with a generic premise: a named object
    would bound the count).
    """
    n = len(objs)
    label = ("yes", "no", "maybe")[index % 3]
    margin = image_size / 16
    shape_count = Counter(o.shape for o in objs)
    single = [i for i, o in enumerate(objs) if shape_count[o.shape] == 1]
    pairs = [(i, j, rel) for i, a in enumerate(objs) for j, b in enumerate(objs) if i != j
             for rel, d in (("left of", b.cx - a.cx), ("above", b.cy - a.cy)) if d > margin]  # a rel b holds
    kind = "count" if max_objects > 1 and rng.random() < P_COUNT_HYPOTHESIS else \
        ("exists", "colour", "spatial")[int(rng.integers(3))]
    if kind == "colour" and not single or kind == "spatial" and not pairs:
        # Each stands in for the other (one object: colour; no shape the scene has once: two objects, apart), never
        # exists: exists would then come more often from scenes with a repeated shape, a hint in the text.
        kind = "spatial" if kind == "colour" else "colour"
    if kind == "colour":
        focus = [single[int(rng.integers(len(single)))]]
    elif kind == "spatial":
        i, j, relation = pairs[int(rng.integers(len(pairs)))]
        focus = [i, j]
    elif kind == "exists" or label == "maybe":
        focus = [int(rng.integers(n))]
    else:
        focus = list(range(n))  # count: the premise names nothing
    others = [i for i in range(n) if i not in focus]
    k = int(rng.integers(0, len(others) + 1))
    named = sorted(int(i) for i in rng.choice(others, size=k, replace=False)) if k else []
    premise = caption_variants([objs[i] for i in named], rng, k=1)[0] if named else \
        _GENERIC_PREMISES[int(rng.integers(len(_GENERIC_PREMISES)))]
    meta = {"hypothesis_type": kind, "premise_objects": k}
    if label == "maybe":
        o = objs[focus[0]]
        hypothesis = _MAYBE[int(rng.integers(len(_MAYBE)))].format(o=f"{o.colour} {o.shape}")
        return {"premise": premise, "hypothesis": hypothesis, "label": label,
                "meta": {**meta, "hypothesis_type": "unknowable"}}
    if kind == "count":
        m = n if label == "yes" else int(rng.choice([c for c in range(1, max_objects + 1) if c != n]))
        hypothesis = _count_hypothesis(m)
    elif kind == "exists":
        o = objs[focus[0]]
        colour, shape = o.colour, o.shape
        if label == "no":
            present = {(p.colour, p.shape) for p in objs}
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            colour, shape = absent[int(rng.integers(len(absent)))]
        hypothesis = f"there is {_a(colour)} {shape}"
    elif kind == "colour":
        o = objs[focus[0]]
        others_c = [c for c in COLOURS if c != o.colour]
        colour = o.colour if label == "yes" else others_c[int(rng.integers(len(others_c)))]
        hypothesis = f"the {o.shape} is {colour}"
    else:
        a, b = (objs[i] for i in (focus if label == "yes" else focus[::-1]))
        hypothesis = f"the {a.colour} {a.shape} is {relation} the {b.colour} {b.shape}"
    return {"premise": premise, "hypothesis": hypothesis, "label": label, "meta": meta}


# ---- samples ------------------------------------------------------------------------------------------------
def sample_json(task: str, split: str, index: int, image_size: int, seed: int, max_objects: int) -> dict:
    """One sample's JSON (schema of stages/data/schema.py) without drawing its image."""
    if task not in _TASK_CODE:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(_TASK_CODE)}")
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects={max_objects}: the shapes benchmark supports 1..4")
    objs = make_scene(seed, split, index, image_size, max_objects)
    rng = _rng(seed, split, index, stream=_TASK_CODE[task])
    sample: dict = {"id": f"shapes-{task}-{split}-{index:07d}", "task": task,
                    "image_size": [image_size, image_size]}
    fields = task_fields(task, objs, rng, index, image_size, max_objects)
    meta = fields.pop("meta", {})
    sample.update(fields)
    sample["prompt"] = task_prompt(task, sample)
    sample["meta"] = {"objects": [[*o.triple(), *o.box] for o in objs], "generator_version": GENERATOR_VERSION,
                      "seed": seed, "split": split, "index": index, **meta}
    return sample


def make_sample(task: str, split: str, index: int, image_size: int, seed: int, max_objects: int
                ) -> tuple[dict, bytes]:
    """One sample (schema of stages/data/schema.py) and its PNG bytes."""
    sample = sample_json(task, split, index, image_size, seed, max_objects)
    objs = make_scene(seed, split, index, image_size, max_objects)
    return sample, render(objs, image_size, seed, split, index)


def generate(task: str, split: str, n: int, image_size: int, seed: int, max_objects: int = 4
             ) -> Iterator[tuple[dict, bytes]]:
    """n samples of `task` for `split`: (sample_json, png_bytes), deterministic from (seed, split, index)."""
    if not 32 <= image_size <= 1024:
        raise ValueError(f"image_size={image_size}: the shapes benchmark draws 32..1024 px images")
    for i in range(n):
        yield make_sample(task, split, i, image_size, seed, max_objects)
