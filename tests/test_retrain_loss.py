"""The re-training loss against its formula, written out here, on fixed logits and through the trainer.

loss = ce_weight · CE + distill_weight · T² · KL(softmax(teacher / T) ‖ softmax(student / T)), batch mean,
where CE is label-smoothed cross-entropy ((1 − ε)·NLL + ε·mean over classes of −log p) without mixup,
soft-target cross-entropy (Σ −target·log p) with it, plain cross-entropy at ε = 0 (docs/engines.md,
vimtr.engine.train). Nothing else in the suite looks at the loss: dropping the distillation term, or using
its weight or temperature wrongly, would otherwise go unnoticed.
"""
import pytest
import torch
from torch.utils.data import TensorDataset

import vimtr
from vimtr.engine import recipe, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CLASSES = 5


def log_softmax(x):
    x = x.double()
    return x - x.exp().sum(-1, keepdim=True).log()  # written out, not F.log_softmax


def expected_loss(logits, targets, teacher, *, ce_weight, distill_weight, temperature, smoothing, soft):
    logp = log_softmax(logits)
    if soft:  # targets are distributions (mixup/cutmix, smoothing folded in by timm's Mixup)
        ce = -(targets.double() * logp).sum(-1).mean()
    else:
        nll = -logp.gather(1, targets[:, None]).squeeze(1)
        ce = ((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean()
    loss = ce_weight * ce
    if teacher is not None:
        t = temperature
        ps, pt = log_softmax(logits / t), log_softmax(teacher / t)
        kl = (pt.exp() * (pt - ps)).sum(-1).mean()
        loss = loss + distill_weight * t * t * kl
    return loss.item()


def fixed(seed=0, batch=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, CLASSES, generator=g) * 3
    teacher = torch.randn(batch, CLASSES, generator=g) * 3
    targets = torch.randint(0, CLASSES, (batch,), generator=g)
    soft = torch.softmax(torch.randn(batch, CLASSES, generator=g) * 2, dim=-1)
    return logits, teacher, targets, soft


@pytest.mark.parametrize("smoothing,mixup", [(0.1, 0.0), (0.0, 0.0), (0.1, 0.8)], ids=["smoothed", "plain", "mixup"])
@pytest.mark.parametrize("ce_weight,distill_weight,temperature", [(1.0, 0.5, 1.0), (0.3, 2.0, 3.0), (1.0, 0.0, 1.0),
                                                                  (0.0, 1.0, 2.0)])
def test_training_loss_is_the_formula(smoothing, mixup, ce_weight, distill_weight, temperature):
    logits, teacher, targets, soft = fixed()
    criterion, mix = recipe.criterion_and_mixup(CLASSES, mixup, 0.0, smoothing)
    assert (mix is not None) == (mixup > 0)
    y = soft if mixup else targets
    got = recipe.training_loss(logits, y, criterion, ce_weight=ce_weight, teacher_logits=teacher,
                               distill_weight=distill_weight, temperature=temperature)
    want = expected_loss(logits, y, teacher, ce_weight=ce_weight, distill_weight=distill_weight,
                         temperature=temperature, smoothing=smoothing, soft=bool(mixup))
    assert got.item() == pytest.approx(want, rel=1e-6)
    without = recipe.training_loss(logits, y, criterion, ce_weight=ce_weight)  # no teacher: no KL term
    assert without.item() == pytest.approx(expected_loss(logits, y, None, ce_weight=ce_weight, distill_weight=0,
                                                         temperature=1, smoothing=smoothing, soft=bool(mixup)),
                                           rel=1e-6)


def test_distillation_term_is_zero_only_for_the_teachers_own_logits():
    logits, teacher, targets, _ = fixed(1)
    criterion, _ = recipe.criterion_and_mixup(CLASSES, 0.0, 0.0, 0.0)
    kl_only = lambda t: recipe.training_loss(logits, targets, criterion, ce_weight=0.0, teacher_logits=t,
                                             distill_weight=1.0, temperature=2.0).item()
    assert kl_only(logits) == pytest.approx(0.0, abs=1e-6)
    assert kl_only(teacher) > 0.1


# ------------------------------------------------------------------------------------ through the trainer
def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def student(seed=0):
    torch.manual_seed(seed)
    model = vimtr.create_model("vim_tiny", depth=2, embed_dim=32, img_size=32, patch_size=8, num_classes=CLASSES)
    return vimtr.reduce(model, "rmeeto", r=4, interval=1)


def params(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_trainer_minimises_the_formula():
    """One optimizer step on one batch: the trainer's logged loss is the formula on the student's and the
    teacher's logits before the step (non-default weights and temperature, label smoothing)."""
    ds = data()
    model = student()
    teacher = vimtr.restore(student(seed=1)).eval()  # other weights than the student's: a large KL term
    x, y = ds.tensors
    model.set_drop_path(0.0)  # what drop_path=0.0 below does: the forward is deterministic
    model.train()
    with torch.no_grad():
        s_logits, t_logits = model(x), teacher(x)
    kw = dict(ce_weight=0.7, distill_weight=1.5, temperature=2.5, smoothing=0.2)
    out = train.retrain(model, ds, teacher=teacher, epochs=1, batch_size=8, lr=1e-3, drop_path=0.0,
                        label_smoothing=kw["smoothing"],
                        ce_weight=kw["ce_weight"], distill_weight=kw["distill_weight"],
                        distill_temperature=kw["temperature"], progress=False, log=None)
    assert out["steps"] == 1
    want = expected_loss(s_logits, y, t_logits, soft=False, **kw)
    assert out["history"][-1]["train_loss"] == pytest.approx(want, rel=1e-5)


def test_distillation_alone_moves_the_weights():
    """ce_weight = 0: the only gradient is the KL to the teacher (the student's own weights unreduced)."""
    model = student()
    before = params(model)
    out = train.retrain(model, data(), epochs=1, batch_size=4, lr=1e-3, weight_decay=0.0, drop_path=0.0,
                        ce_weight=0.0, distill_weight=1.0, progress=False, log=None)
    assert out["steps"] == 2 and out["history"][-1]["train_loss"] > 0
    assert (params(model) - before).abs().max() > 1e-4
