"""Fixtures for the datagen tests: a tiny random Stable Diffusion pipeline saved to disk (so it is
loaded by path, exactly like a real one) and a tiny BatchNorm CNN with non-trivial running stats."""
import json

import pytest
import torch
import torch.nn as nn

# Small merges list: enough for the tokenizer to emit multi-character tokens; every other string
# falls back to byte-level single characters, which are all in the vocab.
_MERGES = ["p h", "ph o", "pho t", "phot o</w>", "o f</w>", "a n", "an d</w>", "c a", "ca t</w>",
           "d o", "do g</w>", "f r", "fr o", "fro g</w>"]


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip_vocab(folder):
    """vocab.json + merges.txt of a byte-level BPE that the CLIP tokenizer can load."""
    chars = _bytes_to_unicode()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for m in _MERGES:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A random StableDiffusionPipeline (UNet 8/16 channels, 16x16 images) saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_sd")
    vocab_size = write_tiny_clip_vocab(root / "vocab")
    tokenizer = CLIPTokenizer.from_pretrained(root / "vocab", model_max_length=32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=4,
        attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_size=32,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size,
        max_position_embeddings=32))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = root / "pipeline"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_pipeline_dir):
    from dfqkern.datagen import load_pipeline

    return load_pipeline(tiny_pipeline_dir, device="cpu")


class TinyBNNet(nn.Module):
    """conv-BN-ReLU x3 + pool + linear, with random (non-identity) BN running statistics."""

    def __init__(self, channels=3, num_classes=6, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def make_tiny_bn_net(seed=0, channels=3, num_classes=6, size=8):
    """Random weights; BN running statistics measured on a made-up "training distribution"
    (per-channel shifted and scaled smooth noise), so they are realizable by some images but far
    from what N(0, 1) pixels give."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = TinyBNNet(channels, num_classes)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    shift = torch.linspace(-0.8, 0.8, channels).reshape(1, -1, 1, 1)
    scale = torch.linspace(0.4, 1.6, channels).reshape(1, -1, 1, 1)
    net.train()
    with torch.no_grad():
        for _ in range(20):
            low = torch.randn(32, channels, size // 2, size // 2, generator=g)
            x = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
            net(x * scale + shift)
    return net.eval()


@pytest.fixture(name="make_tiny_bn_net")
def make_tiny_bn_net_fixture():
    """The factory itself (tests import nothing from conftest: module names could clash)."""
    return make_tiny_bn_net


@pytest.fixture
def tiny_bn_net():
    return make_tiny_bn_net()
