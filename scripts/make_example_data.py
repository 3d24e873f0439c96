"""Regenerate the bundled example dataset (vlmtune/assets/example) from photos that ship in PyPI wheels.

Run once by a maintainer; the output is committed. Photos: scikit-image's sample data and matplotlib's
grace_hopper.jpg (public domain / permissive, see their packages). Usage:
    python scripts/make_example_data.py
"""
import json
import os
from pathlib import Path

import matplotlib
import numpy as np
import skimage.data as skd
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "vlmtune" / "assets" / "example"

PHOTOS = {
    "astronaut.jpg": (lambda: skd.astronaut(), "An astronaut in a white space suit poses in front of an American flag.",
                      "What is the person wearing?", "A white space suit with mission patches."),
    "coffee.jpg": (lambda: skd.coffee(), "A cup of coffee with latte art on a saucer, seen from above.",
                   "What drink is shown?", "A cup of coffee with latte art."),
    "chelsea.jpg": (lambda: skd.chelsea(), "A ginger tabby cat looks to the side.",
                    "What animal is in the photo?", "A ginger tabby cat."),
    "rocket.jpg": (lambda: skd.rocket(), "A rocket stands on a launch pad under a blue sky.",
                   "What is on the launch pad?", "A rocket ready for launch."),
    "camera.png": (lambda: skd.camera(), "A black and white photo of a man with a camera on a tripod.",
                   "Is this photo in color?", "No, it is black and white."),
    "horse.png": (lambda: (~skd.horse()).astype(np.uint8) * 255, "A white silhouette of a horse on black.",
                  "What shape is shown?", "The silhouette of a horse."),
    "grace_hopper.jpg": (
        lambda: np.asarray(Image.open(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg"))),
        "A portrait of a woman in a navy uniform with medals.",
        "What is she wearing?", "A navy uniform with medals."),
    "coins.png": (lambda: skd.coins(), "Old coins lie on a dark surface, photographed in greyscale.",
                  "How many rows of coins are there?", "There are four rows of coins."),
}


MMBENCH = [  # (image, question, hint, options, answer letter, L3 category, L2 ability)
    ("chelsea.jpg", "What animal is in the image?", None, ["cat", "dog", "horse", "bird"], "A", "image_scene", "coarse_perception"),
    ("coffee.jpg", "What drink is shown?", None, ["tea", "coffee", "juice", "water"], "B", "image_topic", "coarse_perception"),
    ("rocket.jpg", "What is on the launch pad?", "The photo was taken at a space centre.", ["a bus", "a plane", "a rocket", "a tower"], "C",
     "object_localization", "finegrained_perception (instance-level)"),
    ("astronaut.jpg", "What is the person wearing?", None, ["a dress", "a space suit", "a coat"], "B",
     "attribute_recognition", "finegrained_perception (instance-level)"),
    ("camera.png", "Is this photo in color?", None, ["yes", "no"], "B", "image_style", "coarse_perception"),
    ("grace_hopper.jpg", "这张照片里的人穿着什么？", None, ["军装", "泳衣", "睡衣", "雨衣"], "A", "attribute_recognition",
     "finegrained_perception (instance-level)"),
]


def write_mmbench(images: Path, out: Path) -> None:
    """A small dev TSV in VLMEvalKit's MMBench format: circular copies (index + k*1e6, options rotated, answer
    re-lettered) whose image cell refers to the main row's index."""
    import base64
    import io

    import pandas as pd

    rows = []
    for index, (name, question, hint, options, answer, category, l2) in enumerate(MMBENCH):
        buffer = io.BytesIO()
        image = Image.open(images / name).convert("RGB")
        image.thumbnail((224, 224))
        image.save(buffer, format="JPEG", quality=85)
        b64 = base64.b64encode(buffer.getvalue()).decode()
        letters = "ABCD"[: len(options)]
        right = options[letters.index(answer)]
        for k in range(len(options)):
            rotated = options[k:] + options[:k]
            row = {"index": index + k * 1_000_000, "question": question, "hint": hint,
                   "answer": letters[rotated.index(right)], "category": category, "l2-category": l2,
                   "split": "dev", "source": "vlmtune-example", "comment": None,
                   "image": b64 if k == 0 else str(index)}
            row.update(dict(zip(letters, rotated)))
            rows.append(row)
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category",
               "split", "source", "comment", "image"]
    pd.DataFrame(rows).reindex(columns=columns).to_csv(out, sep="\t", index=False)


def main() -> None:
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    pretrain, finetune = [], []
    for i, (name, (load, caption, question, answer)) in enumerate(PHOTOS.items()):
        image = Image.fromarray(load())
        image.thumbnail((320, 320))
        image.save(OUT / "images" / name, quality=88)
        pretrain.append({"id": f"pre{i}", "image": f"images/{name}",
                         "conversations": [{"from": "human", "value": "Give a brief description of the image.\n<image>"},
                                           {"from": "gpt", "value": caption}]})
        finetune.append({"id": f"ft{i}", "image": f"images/{name}",
                         "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                           {"from": "gpt", "value": answer},
                                           {"from": "human", "value": "Describe the image in one sentence."},
                                           {"from": "gpt", "value": caption}]})
    finetune.append({"id": "text0", "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                                      {"from": "gpt", "value": "Paris is the capital of France."}]})
    finetune.append({"id": "text1", "conversations": [{"from": "human", "value": "用一句话介绍你自己。"},
                                                      {"from": "gpt", "value": "我是一个视觉语言助手。"}]})
    (OUT / "pretrain.json").write_text(json.dumps(pretrain, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (OUT / "finetune.json").write_text(json.dumps(finetune, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    write_mmbench(OUT / "images", OUT / "mmbench_dev_en_tiny.tsv")
    print(f"wrote {len(pretrain)} pretrain and {len(finetune)} finetune records and an MMBench-format TSV to {OUT}")


if __name__ == "__main__":
    main()
