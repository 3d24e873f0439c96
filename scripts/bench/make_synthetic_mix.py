"""A synthetic llava_v1_5_mix665k: same record count, components, image-path layout, turn counts and text lengths.

    python scripts/bench/make_synthetic_mix.py OUT.json [--records 665298] [--seed 0]

The real file (LLaVA-1.5's instruction mix) is a shuffled, indent=2 JSON list of 665,298 records:

    coco      364,100  LLaVA-Instruct conversation/detail/complex reasoning, VQAv2, OKVQA, A-OKVQA, RefCOCO
    gqa        72,140  many short questions per image, "Answer the question using a single word or phrase."
    ocr_vqa    80,000  a fixed set of book-cover questions per image
    textvqa    21,953  TextCaps one-sentence captions
    vg         86,417  Visual Genome region descriptions / bounding boxes, many turns
    text-only  40,688  ShareGPT, long multi-turn conversations (~6%)

Each component is imitated with its prompt wording, its number of turns and its question/answer lengths;
free text is cut from the English of Python's own help pages (`pydoc_data`), so tokenizers see real words.
With the vicuna template and a 32k Llama tokenizer the mean sequence is ~850 tokens including 576 image
tokens. Images are only named (`coco/train2017/000000123456.jpg`, `gqa/images/2354786.jpg`, ...); the
startup benchmark does not open them. `--records N` keeps the proportions at a smaller size (tests).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

REAL_COUNTS = {"coco": 364_100, "gqa": 72_140, "ocr_vqa": 80_000, "textvqa": 21_953, "vg": 86_417, "text": 40_688}
# coco is itself a mix; shares of its 364,100 records (LLaVA-1.5 paper, table 7)
COCO_PARTS = {"conversation": 56_681, "detail": 23_240, "complex": 76_643, "vqav2": 82_783,
              "okvqa": 8_998, "aokvqa": 66_160, "refcoco": 49_595}
SHORT = "\nAnswer the question using a single word or phrase."
OBJECTS = ("man", "woman", "dog", "cat", "car", "bus", "train", "table", "chair", "plate", "pizza", "horse",
           "street sign", "umbrella", "bicycle", "skateboard", "kite", "laptop", "phone", "clock", "bed",
           "giraffe", "elephant", "zebra", "boat", "truck", "bench", "tree", "building", "sky", "grass", "shirt")
COLORS = ("red", "blue", "green", "white", "black", "yellow", "brown", "gray", "orange", "pink", "silver")
VQA_QUESTIONS = ("What color is the {o}?", "Is the {o} {c}?", "How many {o}s are there?", "What is the {o} doing?",
                 "Is there a {o} in the picture?", "What is on the {o}?", "Where is the {o}?",
                 "Which side of the photo is the {o} on?", "Is the {o} to the left or to the right of the {p}?",
                 "What kind of {o} is this?", "Are there both a {o} and a {p} in this photo?")
BOOK_QUESTIONS = ("Who wrote this book?", "What is the title of this book?", "What type of book is this?",
                  "Is this a {g} book?", "Is this book related to {g}?", "What is the genre of this book?",
                  "Is this a sci-fi book?", "Is this an educational book?")
GENRES = ("History", "Travel", "Cookbooks, Food & Wine", "Literature & Fiction", "Science & Math", "Law",
          "Health, Fitness & Dieting", "Business & Money", "Children's Books", "Religion & Spirituality")
DETAIL = ("Describe the following image.", "What do you see happening in this image?",
          "Explain the visual content of the image in great detail.", "Can you elaborate on the elements of the picture provided?",
          "What's happening in the scene?", "Analyze the image in a comprehensive and detailed manner.")
CAPTION = "Provide a one-sentence caption for the provided image."
BBOX = "Please provide the bounding box coordinate of the region this sentence describes: "
REGION = "Please provide a short description for this region: "
CHOICE = "\nAnswer with the option's letter from the given choices directly."


class Words:
    """Random runs of English words (Python's help pages), sentence-cased, as free text of a given length."""

    def __init__(self, rng: random.Random):
        from pydoc_data.topics import topics

        words = re.findall(r"[A-Za-z][A-Za-z']*[,.;:?!]?", " ".join(topics[k] for k in sorted(topics)))
        self.text = " ".join(words)
        self.starts = [0]
        for w in words:
            self.starts.append(self.starts[-1] + len(w) + 1)
        self.rng = rng

    def __call__(self, n: int) -> str:
        """About `n` words (at least one), starting with a capital and ending with a period."""
        n = max(1, n)
        i = self.rng.randrange(len(self.starts) - n - 1)
        text = self.text[self.starts[i] : self.starts[i + n] - 1].rstrip(",.;:?!")
        return text[0].upper() + text[1:] + "."


def box(rng: random.Random) -> str:
    """A normalised [x1, y1, x2, y2] box as LLaVA-1.5 writes them."""
    x, y = rng.random() * 0.6, rng.random() * 0.6
    return "[{:.2f}, {:.2f}, {:.2f}, {:.2f}]".format(x, y, x + rng.random() * 0.4, y + rng.random() * 0.4)


def with_image(question: str, rng: random.Random) -> str:
    """The first human message: `<image>` before (most records) or after the text, as in the real file."""
    return "<image>\n" + question if rng.random() < 0.8 else question + "\n<image>"


def vqa(rng, n_turns: int, suffix: str = SHORT) -> list[tuple[str, str]]:
    out = []
    for _ in range(n_turns):
        o, p = rng.sample(OBJECTS, 2)
        q = rng.choice(VQA_QUESTIONS).format(o=o, p=p, c=rng.choice(COLORS))
        a = rng.choice(("Yes", "No", str(rng.randint(0, 9)), rng.choice(COLORS), rng.choice(OBJECTS), "Left", "Right"))
        out.append((q + suffix, a.capitalize()))
    return out


def turns_for(part: str, rng: random.Random, words: Words) -> list[tuple[str, str]]:
    """(human, gpt) pairs of one record of component `part`; the first human text gets `<image>` later."""
    geo = lambda mean, cap: min(cap, 1 + int(rng.expovariate(1 / (mean - 1)))) if mean > 1 else 1  # noqa: E731
    if part == "conversation":
        return [(words(rng.randint(6, 18))[:-1] + "?", words(rng.randint(40, 170))) for _ in range(geo(4.5, 10))]
    if part == "detail":
        return [(rng.choice(DETAIL), words(rng.randint(90, 220)))]
    if part == "complex":
        return [(words(rng.randint(10, 30))[:-1] + "?", words(rng.randint(100, 250)))]
    if part in ("vqav2", "gqa"):
        return vqa(rng, geo(6.0 if part == "vqav2" else 12.0, 30))
    if part == "okvqa":
        return vqa(rng, 1)
    if part == "aokvqa":
        options = "\n".join(f"{k}. {rng.choice(OBJECTS)}" for k in "ABCD")
        return [(words(rng.randint(6, 14))[:-1] + "?\n" + options + CHOICE, rng.choice("ABCD"))]
    if part == "ocr_vqa":
        qs = [q.format(g=rng.choice(GENRES)) for q in rng.sample(BOOK_QUESTIONS, geo(4.5, 8))]
        return [(q, words(rng.randint(2, 9))[:-1] if "title" in q or "wrote" in q else rng.choice(("Yes", "No", rng.choice(GENRES))))
                for q in qs]
    if part == "textcaps":
        return [(CAPTION, words(rng.randint(8, 20)))]
    if part in ("refcoco", "vg"):
        out = []
        for _ in range(geo(9.0 if part == "vg" else 6.0, 20)):
            phrase = words(rng.randint(2, 7))[:-1].lower()
            out.append((BBOX + phrase + ".", box(rng)) if rng.random() < 0.5 else (REGION + box(rng), phrase.capitalize() + "."))
        return out
    if part == "sharegpt":  # long, multi-turn; ~15% exceed 2048 tokens and get truncated
        return [(words(int(rng.lognormvariate(3.8, 1.0))), words(int(rng.lognormvariate(5.5, 0.7)))) for _ in range(geo(3.5, 12))]
    raise ValueError(part)


def image_of(component: str, rng: random.Random) -> tuple[str, str]:
    """(id, image path) in the real layout of each image source."""
    if component == "coco":
        n = f"{rng.randrange(1, 581_929):012d}"
        return n, f"coco/train2017/{n}.jpg"
    if component == "gqa":
        n = str(rng.randrange(1, 2_417_997))
        return n, f"gqa/images/{n}.jpg"
    if component == "ocr_vqa":
        n = str(rng.randrange(10_000_000, 9_999_999_999))
        return n, f"ocr_vqa/images/{n}.jpg"
    if component == "textvqa":
        n = f"{rng.getrandbits(64):016x}"
        return n, f"textvqa/train_images/{n}.jpg"
    n = str(rng.randrange(1, 2_417_997))
    return n, f"vg/VG_100K{'_2' if rng.random() < 0.4 else ''}/{n}.jpg"


def record(component: str, rng: random.Random, words: Words) -> dict:
    """One LLaVA JSON record of `component`."""
    if component == "text":
        rid = "".join(rng.choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=7)) + f"_{rng.randrange(8)}"
        return {"id": rid, "model": "", "conversations": _messages(turns_for("sharegpt", rng, words))}
    part = {"gqa": "gqa", "ocr_vqa": "ocr_vqa", "textvqa": "textcaps", "vg": "vg"}.get(component)
    part = part or rng.choices(list(COCO_PARTS), weights=list(COCO_PARTS.values()))[0]
    rid, image = image_of(component, rng)
    turns = turns_for(part, rng, words)
    turns[0] = (with_image(turns[0][0], rng), turns[0][1])
    return {"id": rid, "image": image, "conversations": _messages(turns)}


def _messages(turns: list[tuple[str, str]]) -> list[dict]:
    return [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def dump(rec: dict) -> str:
    """`json.dumps(rec, indent=2)` nested one level inside the list, written with the C string encoder."""
    s = json.dumps
    head = "".join(f'    {s(k)}: {s(v)},\n' for k, v in rec.items() if k != "conversations")
    msgs = ",\n".join(f'      {{\n        "from": {s(m["from"])},\n        "value": {s(m["value"])}\n      }}' for m in rec["conversations"])
    return "  {\n" + head + '    "conversations": [\n' + msgs + "\n    ]\n  }"


def main(argv=None) -> int:
    """Write the synthetic mix; prints its size and component counts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--records", type=int, default=sum(REAL_COUNTS.values()))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    words = Words(rng)
    total = sum(REAL_COUNTS.values())
    counts = {k: round(v * args.records / total) for k, v in REAL_COUNTS.items()}
    counts["coco"] += args.records - sum(counts.values())
    order = [k for k, v in counts.items() for _ in range(v)]
    rng.shuffle(order)  # the real file is shuffled
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i, component in enumerate(order):
            f.write((",\n" if i else "") + dump(record(component, rng, words)))
        f.write("\n]\n")
    size = args.out.stat().st_size
    print(f"{args.out}: {len(order):,} records, {size / 2**20:,.0f} MiB, {time.perf_counter() - start:.0f} s; "
          + ", ".join(f"{k} {v:,}" for k, v in counts.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
