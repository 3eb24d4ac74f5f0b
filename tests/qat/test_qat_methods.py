"""Each QAT method's distinctive mechanism on a tiny net, against the formula written out here."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfqkern.qat import QATConfig
from dfqkern.qat.features import (attention_centre, channel_attention, channel_energy, default_feature_names,
                                  spatial_attention)
from dfqkern.qat.generator import ConditionalGenerator
from dfqkern.qat.losses import bns_loss, kd_kl, soft_cross_entropy
from dfqkern.qat.methods import METHODS, TeacherOutput, method_class, method_options

IMAGE_SHAPE = (3, 8, 8)
K = 5  # the tiny teacher's classes


def _method(name, teacher, **cfg):
    """A method bound to the teacher as the engine binds it (BN layers, feature points, teacher view)."""
    from dfqkern.datagen.bn_inversion import bn_layers
    from dfqkern.qat.engine import _Teacher

    config = QATConfig(method=name, latent_dim=16, generator_width=16, progress=False, **cfg)
    m = method_class(name)(config, method_options(name, config.options), K, IMAGE_SHAPE)
    m.bn_layers = bn_layers(teacher)
    m.feature_names = ["bn1", "block"] if m.uses_features else []
    m.teacher, m.teacher_module = _Teacher(teacher, m.feature_names, True), teacher
    return m


def _logits(seed=0, n=6):
    return torch.randn(n, K, generator=torch.Generator().manual_seed(seed)) * 2


def test_registry_lists_every_method_of_the_issue():
    assert set(METHODS) == {"gdfq", "qimera", "ait", "hast", "texq", "akt", "acq"}
    for name in METHODS:  # one line per undocumented choice: every method docstring says what it chose
        doc = method_class(name).__module__
        import importlib

        assert importlib.import_module(doc).__doc__.strip()


# ----------------------------------------------------------------------------- shared losses + GDFQ

def test_bns_loss_is_gdfqs_formula(teacher):
    from dfqkern.datagen.bn_inversion import BNCapture, bn_layers

    x = torch.randn(6, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(3))
    layers = bn_layers(teacher)
    with BNCapture(teacher) as cap:
        teacher(x)
        got = bns_loss(cap.inputs, layers)
        expect = 0.0
        for inp, bn in zip(cap.inputs, layers):
            c = inp.shape[1]
            flat = inp.transpose(0, 1).reshape(c, -1)
            mean = flat.mean(1)
            var = ((flat - mean[:, None]) ** 2).mean(1)
            expect += ((mean - bn.running_mean) ** 2).sum() / c + ((var - bn.running_var) ** 2).sum() / c
        expect /= len(layers)
    torch.testing.assert_close(got, expect)


def test_kd_kl_and_soft_ce_formulas():
    s, t = _logits(0), _logits(1)
    for temp in (1.0, 4.0):
        pt, ps = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
        expect = (temp ** 2) * (pt * (pt.log() - ps.log())).sum(1).mean()
        torch.testing.assert_close(kd_kl(s, t, temp), expect)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(soft_cross_entropy(s, F.one_hot(y, K).float()), F.cross_entropy(s, y))


def test_gdfq_generator_conditions_on_the_label_embedding():
    torch.manual_seed(0)
    g = ConditionalGenerator(K, IMAGE_SHAPE, latent_dim=16, width=16)
    y = torch.tensor([0, 3, 3, 1])
    torch.testing.assert_close(g.condition(F.one_hot(y, K).float()), g.embedding.weight[y])
    z = torch.randn(4, 16)
    x = g(z, F.one_hot(y, K).float())
    assert x.shape == (4, *IMAGE_SHAPE)
    # the last layer is BN without affine, in train mode: (u - batch mean) / sqrt(batch var + eps) per channel
    h = g.bn0(g.fc(z * g.embedding.weight[y]).reshape(4, 16, 2, 2))
    u = g.up[:-1](h)
    mean, var = u.mean(dim=(0, 2, 3), keepdim=True), u.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(x, (u - mean) / torch.sqrt(var + 1e-5))
    with pytest.raises(ValueError, match="multiples of 4"):
        ConditionalGenerator(K, (3, 6, 6))


def test_gdfq_losses(teacher):
    m = _method("gdfq", teacher, ce_weight=0.7, kd_weight=1.3, temperature=2.0)
    batch = m.sample(6, 16, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(batch.targets, F.one_hot(batch.labels, K).float())
    x = torch.randn(6, *IMAGE_SHAPE)
    t = m.teacher(x)
    loss, _ = m.generator_loss(batch, x, t)
    torch.testing.assert_close(loss, F.cross_entropy(t.logits, batch.labels) + 0.1 * bns_loss(t.bn_inputs, m.bn_layers))
    sb = m.student_batch(batch, x, t, torch.Generator())
    s = _logits(2)
    loss, _ = m.student_loss(sb, s, None)
    torch.testing.assert_close(loss, 0.7 * F.cross_entropy(s, batch.labels) + 1.3 * kd_kl(s, t.logits.detach(), 2.0))


# ----------------------------------------------------------------------------- Qimera

def test_qimera_superposed_embeddings_dml_and_soft_labels(teacher):
    m = _method("qimera", teacher, options={"mix_fraction": 0.5, "mix_classes": 2})
    gen = m.build_generator(teacher)
    # extracted embedding initialization: the classifier's rows; the latent is the classifier's input width
    assert gen.latent_dim == teacher.fc.in_features
    torch.testing.assert_close(gen.embedding.weight, teacher.fc.weight)
    assert isinstance(gen.mapping, nn.Linear)
    with torch.no_grad():  # a non-identity DML, so the test sees where it is applied
        gen.mapping.weight.copy_(torch.randn(gen.latent_dim, gen.latent_dim,
                                             generator=torch.Generator().manual_seed(4)))
    batch = m.sample(8, gen.latent_dim, torch.Generator().manual_seed(1), "cpu")
    mixed, plain = batch.targets[:4], batch.targets[4:]
    assert ((mixed > 0).sum(1) == 2).all() and torch.allclose(mixed.sum(1), torch.ones(4))
    assert ((plain > 0).sum(1) == 1).all()
    assert torch.equal(batch.labels, batch.targets.argmax(1))
    for row in mixed:  # condition = DML(lambda_a E[a] + lambda_b E[b])
        (a, b), E = row.nonzero().flatten().tolist(), gen.embedding.weight
        expect = gen.mapping(row[a] * E[a] + row[b] * E[b])
        torch.testing.assert_close(gen.condition(row[None])[0], expect)
    # soft labels reach the generator's and the student's cross-entropy
    x = torch.randn(8, *IMAGE_SHAPE)
    t = m.teacher(x)
    expect_ce = -(batch.targets * F.log_softmax(t.logits, 1)).sum(1).mean()
    loss, logs = m.generator_loss(batch, x, t)
    assert logs["g_ce"] == pytest.approx(expect_ce.item(), rel=1e-6)


def test_qimera_switches(teacher):
    gen = _method("qimera", teacher, options={"dml": False, "eei": False}).build_generator(teacher)
    assert isinstance(gen.mapping, nn.Identity) and gen.latent_dim == 16
    b = _method("qimera", teacher, options={"mix_fraction": 0.0}).sample(6, 16, torch.Generator(), "cpu")
    assert ((b.targets > 0).sum(1) == 1).all()


# ----------------------------------------------------------------------------- AIT

def test_ait_student_loss_is_kl_only(teacher):
    m = _method("ait", teacher, ce_weight=5.0, temperature=3.0)
    sb = m.student_batch(m.sample(6, 16, torch.Generator(), "cpu"), torch.zeros(6, *IMAGE_SHAPE),
                         TeacherOutput(_logits(1), None, []), torch.Generator())
    s = _logits(0)
    loss, _ = m.student_loss(sb, s, None)
    torch.testing.assert_close(loss, kd_kl(s, _logits(1), 3.0))


def test_ait_flip_factor_formula():
    from dfqkern.qat.methods.ait import flip_factors

    # scale 0.5, zero point 2, 3-bit (codes 0..7): w/s = 2.3 -> rounds to 2, code 4
    w, s, zp = torch.tensor([[1.15, 1.15, 1.15, 2.5 * 0.5 + 0.05]]), torch.tensor([0.5]), torch.tensor([2])
    g = torch.tensor([[-1.0, 2.0, 0.0, -1.0]])
    f = flip_factors(w, g, s, zp, 3, lr=0.1)
    # step in code units = -lr g / s: +0.2 (to boundary 2.5: 0.2 away -> 1.0); -0.4 (to 1.5: 0.8 -> 2.0);
    # zero gradient never flips; w/s = 2.6 -> code 5, moving up 0.2 to the boundary 3.5: 0.9 -> 4.5
    torch.testing.assert_close(f[0, :2], torch.tensor([1.0, 2.0]))
    assert math.isinf(f[0, 2].item())
    assert f[0, 3].item() == pytest.approx(4.5)
    at_top = flip_factors(torch.tensor([[5 * 0.5]]), torch.tensor([[-1.0]]), s, zp, 3, lr=0.1)  # code 7, moving up
    assert math.isinf(at_top.item())
    clipped = flip_factors(torch.tensor([[7 * 0.5]]), torch.tensor([[1.0]]), s, zp, 3, lr=0.1)  # 9 -> code 7
    assert clipped.item() == pytest.approx((9 - 6.5) / 0.2)  # down from 9 past 6.5, 0.2 per unit factor


def test_ait_gradient_inundation_flips_enough_weights(teacher, make_student):
    from dfqkern.nn import QuantLayer

    m = _method("ait", teacher, options={"flip_ratio": 0.05, "max_factor": 1e9})
    q = make_student(3, 4)
    gen = torch.Generator().manual_seed(0)
    layers = [l for l in q.modules() if isinstance(l, QuantLayer)]
    for l in layers:
        l.weight.requires_grad_(True)
        l.weight.grad = torch.randn(l.weight.shape, generator=gen) * 1e-3
    raw = {l: l.weight.grad.clone() for l in layers}
    lr = 1e-4
    logs = m.before_student_step(q, lr)
    assert logs["inundation"] > 1
    for l in layers:
        wq = l.w_quant
        factor = (l.weight.grad / raw[l]).flatten()[0].item()
        torch.testing.assert_close(l.weight.grad, raw[l] * factor)

        def flipped(f):
            with torch.no_grad():
                return (wq.codes(l.weight - lr * f * raw[l]) != wq.codes(l.weight)).float().mean().item()
        assert flipped(factor) >= 0.05  # the rule: at least flip_ratio of the codes change ...
        assert factor == 1.0 or flipped(factor * 0.999) < 0.05  # ... and no smaller factor would do
    capped = _method("ait", teacher, options={"flip_ratio": 0.05, "max_factor": 3.0})
    for l in layers:
        l.weight.grad = raw[l].clone()
    assert capped.before_student_step(q, lr)["inundation"] == pytest.approx(3.0)
    m_off = _method("ait", teacher, options={"inundation": False})
    assert m_off.before_student_step(q, lr) == {}


# ----------------------------------------------------------------------------- HAST

def test_hast_focal_term_promotion_and_alignment(teacher):
    from dfqkern.qat.methods.hast import feature_alignment, focal_target_loss, promotion_weights

    logits, y = _logits(0), torch.tensor([0, 1, 2, 3, 4, 0])
    onehot = F.one_hot(y, K).float()
    p = F.softmax(logits, 1)[torch.arange(6), y]
    for gamma in (0.0, 2.0, 3.5):
        expect = ((1 - p) ** gamma * -torch.log(p)).mean()
        torch.testing.assert_close(focal_target_loss(logits, onehot, gamma), expect)
    torch.testing.assert_close(focal_target_loss(logits, onehot, 0.0), F.cross_entropy(logits, y))
    w = promotion_weights(logits, onehot)
    torch.testing.assert_close(w, (2 - p) / (2 - p).mean())
    fs = [torch.randn(6, 4, 3, 3), torch.randn(6, 2, 2, 2)]
    ft = [torch.randn(6, 4, 3, 3), torch.randn(6, 2, 2, 2)]
    expect = sum(((a - b) ** 2).sum() / (b ** 2).sum() for a, b in zip(fs, ft)) / 2
    torch.testing.assert_close(feature_alignment(fs, ft), expect)

    m = _method("hast", teacher, bns_weight=0.0, options={"focal_gamma": 2.5})
    batch = m.sample(6, 16, torch.Generator().manual_seed(0), "cpu")
    x = torch.randn(6, *IMAGE_SHAPE)
    t = m.teacher(x)
    loss, _ = m.generator_loss(batch, x, t)  # the generator's target term is the focal one
    torch.testing.assert_close(loss, focal_target_loss(t.logits, batch.targets, 2.5))
    sb = m.student_batch(batch, x, t, torch.Generator())
    s, feats = _logits(3), [f + 0.1 for f in sb.teacher.features]
    loss, _ = m.student_loss(sb, s, feats)
    wts = promotion_weights(sb.teacher.logits, sb.targets)
    per = kd_kl(s, sb.teacher.logits, 1.0, reduction="none") + soft_cross_entropy(s, sb.targets, reduction="none")
    torch.testing.assert_close(loss, (wts * per).mean() + feature_alignment(feats, sb.teacher.features))


def test_focal_gamma_reaches_hast_from_the_cli_parser():
    from dfqkern import cli

    args = cli.build_parser().parse_args(["finetune", "--model", "m", "--calib-data", "d", "--out", "o",
                                          "--method", "hast", "--set", "focal_gamma=3.5"])
    assert QATConfig(method=args.method, options=cli._key_values(args.set, "--set")).options["focal_gamma"] == 3.5


# ----------------------------------------------------------------------------- AKT

def test_akt_attention_maps_and_loss(teacher):
    from dfqkern.qat.methods.akt import refined_feature_distillation

    f = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    sp = (f ** 2).sum(1).reshape(2, -1)
    torch.testing.assert_close(spatial_attention(f), sp / sp.norm(dim=1, keepdim=True))
    ch = (f ** 2).mean(dim=(2, 3))
    torch.testing.assert_close(channel_attention(f), ch.exp() / ch.exp().sum(1, keepdim=True))

    m = _method("akt", teacher, options={"alpha": 0.3, "rfd_scale": 10.0})
    batch = m.sample(4, 16, torch.Generator(), "cpu")
    x = torch.randn(4, *IMAGE_SHAPE)
    sb = m.student_batch(batch, x, m.teacher(x), torch.Generator())
    feats = [t * 1.5 + 0.2 for t in sb.teacher.features]
    s = _logits(1, 4)
    loss, _ = m.student_loss(sb, s, feats)
    rfd = sum(((spatial_attention(a) - spatial_attention(b)) ** 2).mean()
              + ((channel_attention(a) - channel_attention(b)) ** 2).mean() for a, b in zip(feats, sb.teacher.features))
    torch.testing.assert_close(loss, 0.3 * 10.0 * rfd + 0.7 * kd_kl(s, sb.teacher.logits))
    only_sp = refined_feature_distillation(feats, sb.teacher.features, spatial=True, channel=False)
    torch.testing.assert_close(only_sp, sum(((spatial_attention(a) - spatial_attention(b)) ** 2).mean()
                                            for a, b in zip(feats, sb.teacher.features)))


def test_feature_points_are_blocks_else_folded_bns(make_student, teacher):
    q = make_student()
    assert default_feature_names(q) == ["block"]
    from dfqkern.config import QuantConfig
    from dfqkern.quantize import quantize_model

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    assert default_feature_names(quantize_model(plain, QuantConfig(act_bits=8))) == ["1"]


# ----------------------------------------------------------------------------- TexQ

def test_texq_texture_centres_and_mixup(teacher):
    from dfqkern.qat.methods.texq import mixup, texture_centre_loss

    f = torch.rand(3, 4, 2, 2)
    e = (f ** 2).mean(dim=(2, 3))
    torch.testing.assert_close(channel_energy(f), e / e.sum(1, keepdim=True))
    centres = [torch.rand(K, 4)]
    targets = F.one_hot(torch.tensor([1, 4, 0]), K).float()
    expect = ((channel_energy(f) - centres[0][[1, 4, 0]]) ** 2).sum(1).mean()
    torch.testing.assert_close(texture_centre_loss([f], centres, targets), expect)

    x = torch.randn(6, *IMAGE_SHAPE)
    t6 = F.one_hot(torch.arange(6) % K, K).float()
    xm, tm, partner, lam = mixup(x, t6, 3, torch.Generator().manual_seed(0))
    for i in range(3):
        torch.testing.assert_close(xm[i], lam[i] * x[i] + (1 - lam[i]) * x[partner[i]])
        torch.testing.assert_close(tm[i], lam[i] * t6[i] + (1 - lam[i]) * t6[partner[i]])
    assert torch.equal(xm[3:], x[3:]) and torch.equal(tm[3:], t6[3:])

    m = _method("texq", teacher, options={"centre_iters": 3})
    m.setup(teacher, None, torch.Generator().manual_seed(0), "cpu")
    assert [c.shape for c in m.centres] == [(K, 8), (K, 8)]
    torch.testing.assert_close(m.centres[0].sum(1), torch.ones(K))
    batch = m.sample(6, 16, torch.Generator(), "cpu")
    xg = torch.randn(6, *IMAGE_SHAPE)
    t = m.teacher(xg)
    loss, logs = m.generator_loss(batch, xg, t)
    assert logs["texture"] == pytest.approx(texture_centre_loss(t.features, m.centres, batch.targets).item())
    sb = m.student_batch(batch, xg, t, torch.Generator().manual_seed(1))
    torch.testing.assert_close(sb.teacher.logits, teacher(sb.inputs))  # the teacher is asked about the mixed images


# ----------------------------------------------------------------------------- ACQ

def test_acq_attention_centre_pairs_and_consistency(teacher):
    from dfqkern.qat.methods.acq import batch_statistics_bn

    f = torch.zeros(1, 2, 5, 3)
    f[0, 1, 4, 0] = 3.0  # all attention at the bottom-left pixel: (y, x) = (1, -1)
    torch.testing.assert_close(attention_centre(f), torch.tensor([[1.0, -1.0]]))
    f2 = torch.ones(1, 1, 4, 4)
    torch.testing.assert_close(attention_centre(f2), torch.zeros(1, 2), atol=1e-6, rtol=0)

    m = _method("acq", teacher)
    batch = m.sample(6, 16, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(batch.labels[:3], batch.labels[3:])
    pos = batch.extra["position"]
    assert torch.equal(pos[:3], pos[3:]) and pos.abs().max() <= 0.5
    assert not torch.equal(batch.z[:3], batch.z[3:])
    with pytest.raises(ValueError, match="even"):
        m.sample(5, 16, torch.Generator(), "cpu")

    bn = teacher.bn1
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(6, *IMAGE_SHAPE)
    with batch_statistics_bn(teacher):
        y = bn(teacher.conv1(x))
    expect = F.batch_norm(teacher.conv1(x), None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(y, expect)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not bn.training

    gen = m.build_generator(teacher)
    images = m.generate(gen, batch)
    t = m.teacher(images)
    loss, logs = m.generator_loss(batch, images, t)
    from dfqkern.qat.features import attention_distribution

    f_last = t.features[-1]
    assert logs["acm"] == pytest.approx(((attention_centre(f_last) - pos) ** 2).sum(1).mean().item(), rel=1e-5)
    a = attention_distribution(f_last)
    assert logs["pair"] == pytest.approx(-(a[:3] - a[3:]).abs().mean().item(), rel=1e-5)
    with batch_statistics_bn(teacher):
        a_train = attention_distribution(m.teacher(images).features[-1])
    assert logs["consistency"] == pytest.approx(((a - a_train) ** 2).mean().item(), rel=1e-5)
    loss.backward()
    assert gen.position.weight.grad is not None and gen.position.weight.grad.abs().sum() > 0
