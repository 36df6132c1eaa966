"""A synthetic image-caption set for the demo: one coloured shape per image (PIL), a word-level
vocabulary of its own (no tokenizer download), and captions that can be corrupted.

Each image holds one shape with a colour, a size and a horizontal position. Its caption says
them, then two words no image can predict::

    a large red circle on the left . it is lucky and quiet <eos>

A corrupted caption has every visual word (size, colour, shape, position) replaced by a different
value, so it contradicts its image: drawn uniformly at random (``corruption="random"``), or the
next value of the attribute's list, always the same one (``"systematic"``: red -> green, circle ->
square; the wrong word is then a function of the image). The model sees
``<bos> <image> x 16 describe :`` and is trained on the caption.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

from ..gap import IGNORE_INDEX

ATTRIBUTES = {
    "size": ("small", "large"),
    "colour": ("red", "green", "blue", "yellow", "purple", "white"),
    "shape": ("circle", "square", "triangle", "diamond"),
    "position": ("left", "middle", "right"),
}
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (230, 215, 40),
       "purple": (160, 60, 205), "white": (240, 240, 240)}
RADIUS = {"small": 4, "large": 7}
CENTRE_X = {"left": 7, "middle": 16, "right": 25}
FILLERS = ("lucky", "quiet", "famous", "old", "new", "rare", "cheap", "happy",
           "secret", "borrowed", "loud", "gentle", "lost", "sold", "clean", "strange")
SPECIAL = ("<pad>", "<bos>", "<eos>")
PROMPT = ("describe", ":")
TEMPLATE = ("a", "on", "the", ".", "it", "is", "and")
IMAGE_WORD = "<image>"
# Where each word sits in a caption (``caption_words``): the visual words and the two fillers.
VISUAL_SLOTS = {"size": 1, "colour": 2, "shape": 3, "position": 6}
FILLER_SLOTS = (10, 12)
CAPTION_LENGTH = 14
CORRUPTIONS = ("random", "systematic")
IMAGE_SIZE = 32
PATCH_SIZE = 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
PROMPT_LENGTH = 1 + N_IMAGE_TOKENS + len(PROMPT)  # <bos> <image> x 16 describe :


class Vocab:
    """Word-level vocabulary; the image placeholder is the last id (``tiny_llava``'s choice)."""

    def __init__(self, words=None):
        if words is None:
            words = [*SPECIAL, *PROMPT, *TEMPLATE, *(w for vs in ATTRIBUTES.values() for w in vs),
                     *FILLERS, IMAGE_WORD]
        self.words = list(words)
        self.ids = {w: i for i, w in enumerate(self.words)}
        if len(self.ids) != len(self.words) or self.words[-1] != IMAGE_WORD:
            raise ValueError("vocabulary words must be unique and end with <image>")

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words) -> list[int]:
        return [self.ids[w] for w in words]

    def decode(self, ids) -> list[str]:
        return [self.words[int(i)] for i in ids]

    @property
    def pad(self) -> int:
        return self.ids["<pad>"]

    @property
    def image(self) -> int:
        return self.ids[IMAGE_WORD]

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"words": self.words}, indent=1))

    @classmethod
    def load(cls, path) -> "Vocab":
        return cls(json.loads(Path(path).read_text())["words"])


@dataclasses.dataclass(frozen=True)
class Scene:
    size: str
    colour: str
    shape: str
    position: str
    y: int
    jitter: int

    def visual(self) -> dict:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def random_scene(rng: random.Random) -> Scene:
    return Scene(*(rng.choice(v) for v in ATTRIBUTES.values()), y=rng.randint(9, 23),
                 jitter=rng.randint(-1, 1))


def render(scene: Scene, rng: random.Random):
    """A 32 x 32 RGB PIL image of the scene on a dark, slightly noisy background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (20, 20, 28))
    draw = ImageDraw.Draw(img)
    r = RADIUS[scene.size] + scene.jitter
    cx, cy = CENTRE_X[scene.position] + rng.randint(-1, 1), scene.y
    fill = RGB[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def caption_words(visual: dict, fillers: tuple[str, str]) -> list[str]:
    return ["a", visual["size"], visual["colour"], visual["shape"], "on", "the", visual["position"],
            ".", "it", "is", fillers[0], "and", fillers[1], "<eos>"]


def corrupt(visual: dict, rng: random.Random) -> dict:
    """Every visual word replaced by a different value of the same attribute, drawn at random."""
    return {a: rng.choice([v for v in ATTRIBUTES[a] if v != visual[a]]) for a in ATTRIBUTES}


def corrupt_systematically(visual: dict) -> dict:
    """Every visual word replaced by the next value of its attribute (the same one every time)."""
    return {a: ATTRIBUTES[a][(ATTRIBUTES[a].index(visual[a]) + 1) % len(ATTRIBUTES[a])] for a in ATTRIBUTES}


@dataclasses.dataclass
class CaptionSet:
    pixel_values: torch.Tensor       # [N, 3, 32, 32], scaled to [-1, 1]
    scenes: list                     # the truth of each image
    captions: list                   # list of word lists (possibly corrupted)
    corrupted: torch.Tensor          # bool [N]
    images: list                     # PIL images (for pictures)

    def __len__(self) -> int:
        return len(self.scenes)


def make_set(n: int, seed: int, noise: float = 0.0, corruption: str = "random") -> CaptionSet:
    """``n`` images and captions from ``seed``; a share ``noise`` of the captions (exactly
    ``round(noise * n)``, chosen at random) is corrupted (``corruption``: "random" or
    "systematic"). The images, fillers and clean captions depend on ``seed`` only, so sets with
    different ``noise`` or ``corruption`` share their images."""
    import numpy as np

    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    rng = random.Random(seed)
    scenes, images, clean = [], [], []
    for _ in range(n):
        scene = random_scene(rng)
        scenes.append(scene)
        images.append(render(scene, rng))
        clean.append((scene.visual(), (rng.choice(FILLERS), rng.choice(FILLERS))))
    noise_rng = random.Random(f"{seed}-noise")  # same corrupted subset order for every rate
    order = list(range(n))
    noise_rng.shuffle(order)
    bad = set(order[:round(noise * n)])
    captions = []
    for i, (visual, fillers) in enumerate(clean):
        if i in bad:
            visual = (corrupt(visual, random.Random(f"{seed}-{i}")) if corruption == "random"
                      else corrupt_systematically(visual))
        captions.append(caption_words(visual, fillers))
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # [N, H, W, 3]
    pixels = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
    corrupted = torch.tensor([i in bad for i in range(n)], dtype=torch.bool)
    return CaptionSet(pixels.contiguous(), scenes, captions, corrupted, images)


def prompt_ids(vocab: Vocab) -> list[int]:
    return [vocab.ids["<bos>"], *[vocab.image] * N_IMAGE_TOKENS, *vocab.encode(PROMPT)]


def batch(data: CaptionSet, index, vocab: Vocab) -> dict:
    """A training batch: ``<bos> <image> x 16 describe :`` unsupervised, the caption supervised."""
    prompt = prompt_ids(vocab)
    ids, labels = [], []
    for i in index:
        cap = vocab.encode(data.captions[int(i)])
        ids.append(prompt + cap)
        labels.append([IGNORE_INDEX] * len(prompt) + cap)
    input_ids = torch.tensor(ids)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                labels=torch.tensor(labels), pixel_values=data.pixel_values[torch.as_tensor(index)])
