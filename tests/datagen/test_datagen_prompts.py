import collections

import pytest
import torch

from dfqkern.datagen import prompts as P


def test_builtin_class_sets():
    assert len(P.class_names("cifar10")) == 10 and P.class_names("cifar10")[0] == "airplane"
    c100 = P.class_names("cifar100")
    assert len(c100) == 100 == len(set(c100)) and c100[1] == "aquarium fish" and c100[-1] == "worm"
    imnet = P.class_names("imagenet")
    assert len(imnet) == 1000 == len(set(imnet))  # timm's bundled names, duplicates disambiguated
    assert imnet[0] == "tench" and imnet[1] == "goldfish"
    assert imnet[134] != imnet[517]


def test_class_file(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\nred fox\n\ntabby cat  # comment\n")
    assert P.class_names(f) == ["red fox", "tabby cat"]
    f.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no class names"):
        P.class_names(f)
    f.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match="'cat' appears twice"):
        P.class_names(f)
    with pytest.raises(ValueError, match="imagenet.*cifar10.*neither"):
        P.class_names(tmp_path / "missing.txt")


@pytest.mark.parametrize("num_classes,k,n", [(10, 2, 37), (10, 3, 41), (7, 3, 50), (5, 5, 12), (10, 1, 23)])
def test_balanced_coverage(num_classes, k, n):
    names = [f"c{i}" for i in range(num_classes)]
    mode = "single" if k == 1 else "mixup"
    recs = P.build_prompts(names, n, mode, mixup_k=max(k, 2) if mode == "mixup" else 2, seed=5)
    counts = collections.Counter(c for r in recs for c in r.classes)
    assert sum(counts.values()) == n * k
    full = [counts.get(c, 0) for c in range(num_classes)]
    assert max(full) - min(full) <= 1, full
    for r in recs:
        assert len(set(r.classes)) == k  # k distinct classes per image


def test_mixup_records():
    recs = P.build_prompts("cifar10", 20, "mixup", mixup_k=3, weights="dirichlet", seed=1)
    names = P.class_names("cifar10")
    for i, r in enumerate(recs):
        assert r.index == i and r.mode == "mixup" and len(r.classes) == 3
        assert abs(sum(r.weights) - 1) < 1e-9 and all(w > 0 for w in r.weights)
        assert list(r.weights) == sorted(r.weights, reverse=True)  # listed by decreasing weight
        assert all(names[c] in r.text for c in r.classes)
        label = r.soft_label(10)
        assert torch.isclose(label.sum(), torch.tensor(1.0)) and (label > 0).sum() == 3
        assert P.PromptRecord.from_dict(r.to_dict()) == r
    assert len({r.template for r in recs}) > 1  # several fusing templates used
    assert len({r.seed for r in recs}) == 20
    uniform = P.build_prompts("cifar10", 4, "mixup", mixup_k=2, seed=1)
    assert all(r.weights == (0.5, 0.5) for r in uniform)


def test_prompt_text_and_modes():
    single = P.build_prompts(["apple", "cat"], 6, "single", seed=0)
    assert all(r.classes[0] in (0, 1) and r.weights == (1.0,) for r in single)
    assert any("an apple" in r.text for r in single) and not any("a apple" in r.text for r in single)
    genq = P.build_prompts(["cat"], 30, "genq", seed=0)
    assert all("cat" in r.text for r in genq)
    assert len({r.text for r in genq}) > 3  # adjectives vary
    emb = P.build_prompts("cifar10", 5, "mixup", mixup_k=2, mixup_level="embedding", seed=0)
    for r in emb:
        assert len(r.class_texts) == 2
        assert all(P.class_names("cifar10")[c] in t for c, t in zip(r.classes, r.class_texts))


def test_determinism_and_seeds():
    a = P.build_prompts("cifar100", 16, "mixup", mixup_k=2, weights="dirichlet", seed=3)
    assert a == P.build_prompts("cifar100", 16, "mixup", mixup_k=2, weights="dirichlet", seed=3)
    b = P.build_prompts("cifar100", 16, "mixup", mixup_k=2, weights="dirichlet", seed=4)
    assert [r.classes for r in a] != [r.classes for r in b]
    # Per-image seeds do not depend on how many images are requested.
    assert [r.seed for r in P.build_prompts("cifar10", 4, "single", seed=3)] == [r.seed for r in a[:4]]
    assert P.image_seed(0, 1) != P.image_seed(1, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="bogus"), "mode must be one of"),
    (dict(mode="mixup", mixup_k=1), "mixup_k must be"),
    (dict(mode="mixup", mixup_k=11), "mixup_k must be"),
    (dict(mode="mixup", mixup_level="latent"), "mixup_level must be one of"),
    (dict(mode="mixup", weights="beta"), "weights must be one of"),
    (dict(mode="mixup", weights="dirichlet", dirichlet_alpha=0), "dirichlet_alpha"),
])
def test_build_prompts_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.build_prompts("cifar10", 4, **kwargs)


def test_embedding_mixup_equals_manual_interpolation(tiny_pipeline):
    enc, tok = tiny_pipeline.text_encoder, tiny_pipeline.tokenizer
    texts = [("a photo of a cat", "a photo of a dog"), ("a photo of a frog", "a photo of a ship")]
    weights = [(0.7, 0.3), (0.25, 0.75)]
    embeds, neg = P.mixup_prompt_embeds(enc, tok, texts, weights, negative_prompt="blurry")
    singles = {t: P.encode_text(enc, tok, [t])[0] for pair in texts for t in pair}
    for i, (pair, w) in enumerate(zip(texts, weights)):
        manual = w[0] * singles[pair[0]] + w[1] * singles[pair[1]]
        torch.testing.assert_close(embeds[i], manual, rtol=1e-5, atol=1e-5)
    # The classes really differ, so the interpolation is not trivially equal to either end.
    assert (singles[texts[0][0]] - singles[texts[0][1]]).abs().max() > 1e-3
    assert neg.shape == embeds.shape
    torch.testing.assert_close(neg[0], P.encode_text(enc, tok, ["blurry"])[0])
    with pytest.raises(ValueError, match="same number of class texts"):
        P.mixup_prompt_embeds(enc, tok, [("a", "b"), ("c",)], [(0.5, 0.5), (1.0,)])
