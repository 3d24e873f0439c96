"""Small benchmark TSVs in VLMEvalKit's layouts (MCQ, yes/no, VQA), holding real base64 JPEGs.

Each builder takes the four images of the `images` fixture and returns rows; `write_tsv` (mmbench_tsv.py) writes
them. The files mimic what VLMEvalKit downloads: an image cell of a later row may hold the index of the row with
the image, answers are lists written as Python literals, HallusionBench's indices are text.
"""
from __future__ import annotations

MCQ_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "l2-category", "split",
               "image"]
YORN_COLUMNS = ["index", "question", "answer", "category", "image_path", "image"]
VQA_COLUMNS = ["index", "question", "answer", "category", "image"]


def mcq_rows(images: list[str], n: int = 8) -> list[dict]:
    """ScienceQA-like questions: 2 to 5 options (E included), a hint on some, two categories and L2 abilities."""
    texts = ["cat", "dog", "bird", "fish", "horse"]
    rows = []
    for i in range(n):
        k = 2 + i % 4  # 2, 3, 4, 5 options
        options = {letter: texts[(i + j) % 5] for j, letter in enumerate("ABCDE"[:k])}
        rows.append(dict(index=100 + i, question=f"Which animal is in picture {i}?", hint="Look closely." if i % 3 == 0
                         else None, **options, answer="ABCDE"[i % k], category=("animals", "pets")[i % 2],
                         **{"l2-category": "coarse_perception"}, split="val", image=images[i % 4]))
    return rows


def yorn_rows(images: list[str], n_images: int = 4) -> list[dict]:
    """MME-like: two questions per image (the second row's image cell names the first row), Yes then No."""
    categories = ["existence", "count", "OCR", "code_reasoning"]
    rows = []
    for i in range(n_images):
        path = f"{categories[i]}/{i}.jpg"
        rows.append(dict(index=2 * i, question=f"Is there a cat in image {i}? Please answer yes or no.", answer="Yes",
                         category=categories[i], image_path=path, image=images[i]))
        rows.append(dict(index=2 * i + 1, question=f"Is there a dog in image {i}? Please answer yes or no.",
                         answer="No", category=categories[i], image_path=path, image=str(2 * i)))
    return rows


def vqa_rows(images: list[str], n: int = 8) -> list[dict]:
    """TextVQA-like: ten answers per question, written as a Python list literal."""
    rows = []
    for i in range(n):
        answers = ["red"] * 6 + ["dark red"] * 3 + [f"colour {i}"]
        rows.append(dict(index=i, question=f"What colour is object {i}?", answer=repr(answers),
                         category=("colour", "text")[i % 2], image=images[i % 4]))
    return rows


def mmmu_rows(images: list[str]) -> list[dict]:
    """MMMU-like: a two-image row (a list literal of base64 images), an open question, a one-image MCQ row."""
    return [
        dict(index=0, question="Which picture shows <image 1> best?", A="the first", B="the second",
             answer="A", split="validation", image=repr([images[0], images[1]])),
        dict(index=1, question="How many objects are in <image 1>?", answer="3", split="validation", image=images[2]),
        dict(index=2, question="Which animal?", A="cat", B="dog", C="bird", answer="C", split="dev", image=images[3]),
    ]


MMMU_COLUMNS = ["index", "question", "A", "B", "C", "answer", "split", "image"]
