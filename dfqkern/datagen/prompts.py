"""Class-name sets, text prompts for text-to-image diffusion, and embedding-level mixup.

Three prompt modes, one :class:`PromptRecord` per image:

* ``single`` -- one class per prompt, a handful of "a photo of a {c}" style templates.
* ``genq`` -- one class plus an adjective, in the spirit of GenQ (Jeon et al., "GenQ: Quantization in
  Low Data Regimes with Generative Synthetic Data", 2024) which prompts with class names and
  descriptive modifiers to widen the image distribution.
* ``mixup`` -- k >= 2 classes fused in one prompt ("a photo of a goldfish and a tabby cat"). The
  fused prompt avoids the polysemy of a lone class name and yields images near class boundaries.
  The record carries the mixing weights as a soft label over class indices (summing to 1).
  With ``mixup_level="embedding"`` the k single-class prompts are encoded separately and their
  text-encoder embeddings are interpolated with the weights (see :func:`mixup_prompt_embeds`).

Classes are drawn round-robin over seeded shuffled permutations, so every class appears equally
often (counts differ by at most one) whatever the mode and k.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

CLASS_SETS = ("imagenet", "cifar10", "cifar100")
PROMPT_MODES = ("single", "genq", "mixup")
MIXUP_LEVELS = ("text", "embedding")
WEIGHT_MODES = ("uniform", "dirichlet")

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

# CIFAR-100 fine labels in index order (underscores of the official names turned into spaces).
CIFAR100_CLASSES = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple tree", "motorcycle", "mountain", "mouse", "mushroom", "oak tree", "orange", "orchid",
    "otter", "palm tree", "pear", "pickup truck", "pine tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
)

# ImageNet-1k first synonyms that collide; a prompt must tell them apart.
_IMAGENET_DISAMBIGUATION = {134: "crane bird", 517: "construction crane", 638: "maillot swimsuit",
                            639: "tank suit"}

SINGLE_TEMPLATES = (
    "a photo of a {c}",
    "a close-up photo of a {c}",
    "a bright photo of a {c}",
    "a realistic photo of the {c}",
    "a cropped photo of a {c}",
    "a good photo of a {c}",
)

GENQ_ADJECTIVES = (
    "realistic", "high quality", "detailed", "natural", "close-up", "bright", "dark", "colorful",
    "sharp", "wide-angle", "outdoor", "indoor",
)
GENQ_TEMPLATES = (
    "a {adj} photo of a {c}",
    "a photo of a {adj} {c}",
    "a {adj} image of the {c}",
)

# {items}: "a goldfish and a tabby cat" (or "a x, a y and a z"); {first}/{rest}: split of the same.
MIXUP_TEMPLATES = (
    "a photo of {items}",
    "a realistic photo of {items}",
    "{items} in the same picture",
    "a photo of {first} next to {rest}",
    "a photo of {first} together with {rest}",
)


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """What one synthetic image is asked to show.

    ``text`` is the prompt given to the pipeline (for embedding-level mixup: a readable summary;
    the pipeline then receives ``class_texts`` interpolated with ``weights``). ``classes`` are class
    indices, ``weights`` the soft label over them (sums to 1), ``template`` the template's index in
    the mode's template tuple, ``seed`` the per-image generator seed.
    """
    index: int
    text: str
    classes: tuple[int, ...]
    weights: tuple[float, ...]
    template: int
    seed: int
    mode: str = "single"
    class_texts: tuple[str, ...] = ()

    def soft_label(self, num_classes: int) -> torch.Tensor:
        label = torch.zeros(num_classes, dtype=torch.float32)
        for c, w in zip(self.classes, self.weights):
            label[c] += w
        return label

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["classes"], d["weights"], d["class_texts"] = list(self.classes), list(self.weights), list(self.class_texts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PromptRecord":
        return cls(index=int(d["index"]), text=str(d["text"]), classes=tuple(int(c) for c in d["classes"]),
                   weights=tuple(float(w) for w in d["weights"]), template=int(d["template"]),
                   seed=int(d["seed"]), mode=str(d.get("mode", "single")),
                   class_texts=tuple(d.get("class_texts", ())))


# ----------------------------------------------------------------------------- class names

def class_names(source: "str | Path | Sequence[str]") -> list[str]:
    """Class names by set name (``imagenet``, ``cifar10``, ``cifar100``), text file, or list.

    A text file holds one name per line; blank lines and ``#`` comments are ignored; an empty file
    or a repeated name is an error (the index of a name is its class index).
    """
    if not isinstance(source, (str, Path)):
        return _checked_names(list(source), "classes")
    key = str(source).lower()
    if key == "cifar10":
        return list(CIFAR10_CLASSES)
    if key == "cifar100":
        return list(CIFAR100_CLASSES)
    if key == "imagenet":
        return imagenet_class_names()
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"classes must be one of {list(CLASS_SETS)} or a text file with one class name "
                         f"per line; {str(source)!r} is neither")
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return _checked_names([ln for ln in lines if ln], f"classes file {str(path)!r}")


def _checked_names(names: list[str], what: str) -> list[str]:
    if not names:
        raise ValueError(f"{what} holds no class names")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"{what}: class {i} has an empty name")
        if n in seen:
            raise ValueError(f"{what}: class name {n!r} appears twice (entries {seen[n]} and {i})")
        seen[n] = i
    return list(names)


def imagenet_class_names() -> list[str]:
    """ImageNet-1k names in class-index order: timm's bundled descriptions, first synonym."""
    from timm.data import ImageNetInfo  # heavy import kept local

    names = [d.split(",")[0].strip() for d in ImageNetInfo().label_descriptions()]
    for i, n in _IMAGENET_DISAMBIGUATION.items():
        names[i] = n
    return _checked_names(names, "imagenet")


# ----------------------------------------------------------------------------- sampling

# Random streams drawn from a set's seed, told apart by a fixed tag (ASCII, read as hex) next to the
# seed in the SeedSequence. Every generated set depends on these values: changing one changes the
# images and targets of every seed, and unfinished sets would no longer resume.
PROMPT_STREAM = 0x70726F6D  # "prom": build_prompts' class groups, templates and mixing weights
BN_TARGET_STREAM = 0x626E  # "bn": BN-inversion targets (make_targets)
DGH_INIT_STREAM = 0x64676800  # "dgh\0": image_seed tag of the initial pixels of a dgh set
BN_SHARD_STREAM = 0x5348000  # "SH" << 12: image_seed(seed, BN_SHARD_STREAM + shard) seeds a BN-inversion shard


def stream_rng(seed: int, stream: int) -> np.random.Generator:
    """The generator of one random stream (one of the ``*_STREAM`` tags) of a set seeded ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream]))


def image_seed(seed: int, index: int) -> int:
    """Per-image generator seed: a hash of (set seed, image index), independent of batching or rank."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(1)[0])


def balanced_class_groups(num_classes: int, num_groups: int, k: int,
                          rng: np.random.Generator) -> list[tuple[int, ...]]:
    """``num_groups`` groups of ``k`` distinct classes, every class used equally often.

    The class stream is a sequence of shuffled permutations cut into groups of k. A group that
    straddles two permutations could repeat a class; then the next permutation is reordered
    (elements swapped within it) so its head avoids the classes already in the group -- still a
    permutation, so after every full permutation all counts are equal and any prefix is balanced
    to within one.
    """
    if k < 1 or k > num_classes:
        raise ValueError(f"k (classes per image) must be in [1, {num_classes}], got {k}")
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    while len(groups) < num_groups:
        perm = list(rng.permutation(num_classes))
        if current:  # straddling group: move the conflicting head elements further back
            need = k - len(current)
            taken = set(current)
            for i in range(need):
                if perm[i] in taken:
                    j = next(j for j in range(need, num_classes) if perm[j] not in taken)
                    perm[i], perm[j] = perm[j], perm[i]
        for c in perm:
            current.append(int(c))
            if len(current) == k:
                groups.append(tuple(current))
                current = []
                if len(groups) == num_groups:
                    break
    return groups


def _mix_weights(k: int, mode: str, alpha: float, rng: np.random.Generator) -> tuple[float, ...]:
    if mode == "uniform" or k == 1:
        w = np.full(k, 1.0 / k)
    else:
        w = rng.dirichlet(np.full(k, float(alpha)))
    w = w / w.sum()
    return tuple(float(x) for x in w)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _with_article(name: str) -> str:
    return f"{_article(name)} {name}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _fix_articles(text: str) -> str:
    # "a {c}" templates: use "an" before a vowel-initial class name.
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = _article(words[i + 1])
    return " ".join(words)


def _single_text(template: str, name: str) -> str:
    return _fix_articles(template.format(c=name))


def build_prompts(classes: "str | Path | Sequence[str]", num_images: int, mode: str = "mixup", *,
                  mixup_k: int = 2, mixup_level: str = "text", weights: str = "uniform",
                  dirichlet_alpha: float = 1.0, seed: int = 0) -> list[PromptRecord]:
    """One :class:`PromptRecord` per image, reproducible from ``seed``.

    ``weights`` (mixup only): ``uniform`` (1/k each) or ``dirichlet`` (Dirichlet(alpha) draws).
    For text-level mixup the classes are listed in the prompt in decreasing weight order.
    """
    names = class_names(classes)
    if mode not in PROMPT_MODES:
        raise ValueError(f"mode must be one of {list(PROMPT_MODES)}, got {mode!r}")
    if mixup_level not in MIXUP_LEVELS:
        raise ValueError(f"mixup_level must be one of {list(MIXUP_LEVELS)}, got {mixup_level!r}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {list(WEIGHT_MODES)}, got {weights!r}")
    if not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be a non-negative int, got {num_images!r}")
    if dirichlet_alpha <= 0:
        raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
    k = 1
    if mode == "mixup":
        if not isinstance(mixup_k, int) or not 2 <= mixup_k <= len(names):
            raise ValueError(f"mixup_k must be an int in [2, {len(names)}] (number of classes), got {mixup_k!r}")
        k = mixup_k
    rng = stream_rng(seed, PROMPT_STREAM)
    groups = balanced_class_groups(len(names), num_images, k, rng)
    records = []
    for i, group in enumerate(groups):
        w = _mix_weights(k, weights, dirichlet_alpha, rng) if mode == "mixup" else (1.0,)
        class_texts: tuple[str, ...] = ()
        if mode == "single":
            t = int(rng.integers(len(SINGLE_TEMPLATES)))
            text = _single_text(SINGLE_TEMPLATES[t], names[group[0]])
        elif mode == "genq":
            t = int(rng.integers(len(GENQ_TEMPLATES)))
            adj = GENQ_ADJECTIVES[int(rng.integers(len(GENQ_ADJECTIVES)))]
            text = _fix_articles(GENQ_TEMPLATES[t].format(adj=adj, c=names[group[0]]))
        elif mixup_level == "text":
            order = sorted(range(k), key=lambda j: -w[j])  # stable: ties keep sampling order
            group, w = tuple(group[j] for j in order), tuple(w[j] for j in order)
            t = int(rng.integers(len(MIXUP_TEMPLATES)))
            items = [_with_article(names[c]) for c in group]
            text = MIXUP_TEMPLATES[t].format(items=_join(items), first=items[0], rest=_join(items[1:]))
        else:  # embedding-level: same single template for all k so token positions line up
            t = int(rng.integers(len(SINGLE_TEMPLATES)))
            class_texts = tuple(_single_text(SINGLE_TEMPLATES[t], names[c]) for c in group)
            text = " + ".join(f"{wi:.3f}*[{ct}]" for wi, ct in zip(w, class_texts))
        records.append(PromptRecord(index=i, text=text, classes=tuple(group), weights=tuple(w), template=t,
                                    seed=image_seed(seed, i), mode=mode, class_texts=class_texts))
    return records


def records_digest(records: Sequence[PromptRecord]) -> str:
    """sha256 of the records' content: a resume only continues a set built from the same plan."""
    blob = json.dumps([r.to_dict() for r in records], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------- embedding mixup

@torch.no_grad()
def encode_text(text_encoder, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Per-token text embeddings ``[len(texts), max_length, dim]`` as a Stable Diffusion 1.x/2.x
    pipeline computes them for ``prompt_embeds`` (padded to the tokenizer's max length)."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    cfg = getattr(text_encoder, "config", None)
    mask = None
    if getattr(cfg, "use_attention_mask", False):  # a few encoders expect the mask, as in diffusers
        mask = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").attention_mask.to(device)
    return text_encoder(ids.to(device), attention_mask=mask)[0]


def interpolate_embeddings(embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mix per-class embeddings: ``embeds [n, k, L, D]`` with ``weights [n, k]`` -> ``[n, L, D]``."""
    if embeds.dim() < 3 or weights.shape != embeds.shape[:2]:
        raise ValueError(f"weights must have shape {tuple(embeds.shape[:2])} (images, classes), "
                         f"got {tuple(weights.shape)}")
    w = weights.to(embeds.dtype).reshape(*weights.shape, *([1] * (embeds.dim() - 2)))
    return (embeds * w).sum(dim=1)


def mixup_prompt_embeds(text_encoder, tokenizer, class_texts: Sequence[Sequence[str]],
                        weights: Sequence[Sequence[float]], negative_prompt: "str | None" = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding-level mixup: ``(prompt_embeds, negative_prompt_embeds)`` for a diffusers pipeline.

    Each image i gets ``sum_j weights[i][j] * E(class_texts[i][j])`` where ``E`` is the text
    encoder's per-token output; the negative embeddings are ``E(negative_prompt or "")`` repeated,
    matching shape and dtype (so classifier-free guidance works as with text prompts).
    """
    if len(class_texts) != len(weights):
        raise ValueError(f"class_texts and weights must have the same length, got {len(class_texts)} "
                         f"and {len(weights)}")
    if not class_texts:
        raise ValueError("class_texts is empty")
    k = len(class_texts[0])
    for i, (t, w) in enumerate(zip(class_texts, weights)):
        if len(t) != k or len(w) != k:
            raise ValueError(f"every image needs the same number of class texts and weights ({k}); "
                             f"image {i} has {len(t)} texts and {len(w)} weights")
    flat = [t for texts in class_texts for t in texts]
    e = encode_text(text_encoder, tokenizer, flat)
    e = e.reshape(len(class_texts), k, *e.shape[1:])
    w = torch.tensor([list(x) for x in weights], dtype=torch.float64, device=e.device)
    prompt_embeds = interpolate_embeddings(e, w)
    neg = encode_text(text_encoder, tokenizer, [negative_prompt or ""])
    return prompt_embeds, neg.expand(len(class_texts), *neg.shape[1:]).contiguous()

