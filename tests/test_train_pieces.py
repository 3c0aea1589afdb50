"""Pure pieces of the train loop: metrics, majority baseline, LR schedules, checkpoint round trip, config."""

from __future__ import annotations

import pytest
import torch

from umaf.config import ConfigError, load_config
from umaf.train.checkpoint import load_checkpoint_dir, save_checkpoint_dir
from umaf.train.config import TrainConfig
from umaf.train.loop import build_scheduler
from umaf.train.metrics import classification_metrics, f1_of_weighted_pr, majority_baseline


def test_classification_metrics_by_hand():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class (P, R): a (1/2, 1/2), b (2/3, 1), c (1, 1/2)
    f1 = [0.5, 0.8, 2 / 3]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["weighted_f1"] == pytest.approx(sum(f1) / 3)  # equal supports
    assert m["per_class"]["b"]["recall"] == 1.0
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    base = majority_baseline([1, 1, 0], [0, 1, 2, 1], ["a", "b", "c"])
    assert base["accuracy"] == 0.5 and base["confusion_matrix"][1] == [0, 2, 0]


@pytest.mark.parametrize("precision, recall, published_f1", [
    (89.57, 89.34, 89.46),  # UMAF Table 1/4, MSED sentiment
    (87.60, 86.58, 87.09),  # UMAF Table 1, MSED emotion
    (90.75, 87.99, 89.35),  # UMAF Table 1/4
])
def test_f1_of_weighted_pr_gives_the_umaf_papers_f1(precision, recall, published_f1):
    # The paper prints two decimals: its F1 is the harmonic mean of weighted P and R, each known to
    # +-0.005, so the printed F1 lies between the means of the bounds (rounded to two decimals).
    low = f1_of_weighted_pr(precision - 0.005, recall - 0.005)
    high = f1_of_weighted_pr(precision + 0.005, recall + 0.005)
    assert low - 0.005 <= published_f1 <= high + 0.005
    assert f1_of_weighted_pr(precision, recall) == pytest.approx(2 * precision * recall / (precision + recall))
    # sklearn's weighted F1 is another number. By hand (equal supports; P, R per class a (1/2, 1/2),
    # b (2/3, 1), c (1, 1/2)): weighted P = 13/18, weighted R = 2/3, so the paper's F1 = 2PR/(P+R) =
    # 52/75, while the mean of the per-class F1s is (1/2 + 4/5 + 2/3) / 3 = 59/90.
    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], ["a", "b", "c"])
    assert m["weighted_precision"] == pytest.approx(13 / 18) and m["weighted_recall"] == pytest.approx(2 / 3)
    assert m["f1_of_weighted_pr"] == pytest.approx(52 / 75)
    assert m["weighted_f1"] == pytest.approx(59 / 90)


def test_umaf_paper_presets_select_the_papers_f1():
    for preset in ("paper-msed-sentiment", "paper-msed-emotion", "paper-mvsa-single"):
        assert load_config(TrainConfig, "train", preset=preset).best_metric == "f1_of_weighted_pr", preset


def _lrs(cfg: TrainConfig, steps: int) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, steps_per_epoch=steps // cfg.epochs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_linear_decay_and_steplr():
    lrs = _lrs(TrainConfig(epochs=2, warmup_ratio=0.25, scheduler="linear"), 20)
    assert lrs[0] < lrs[1] < lrs[4] and max(lrs) == pytest.approx(1.0)
    assert lrs[5] > lrs[10] > lrs[19] > 0
    cfg = TrainConfig(epochs=30, scheduler="step", step_size=10, gamma=0.5)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, steps_per_epoch=3)
    for _ in range(10):
        opt.step()
        sched.step()  # the loop steps StepLR once per epoch
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)



def test_cosine_and_constant_schedules_after_warmup():
    """20 steps, warm-up over the first 5 (lr (s+1)/6), then half a cosine from 1 to 0 over the last
    15 steps, or a constant 1: the values follow the formulas step by step."""
    import math

    warmup = [(s + 1) / 6 for s in range(5)]
    cosine = _lrs(TrainConfig(epochs=2, warmup_ratio=0.25, scheduler="cosine"), 20)
    assert cosine[:5] == pytest.approx(warmup)
    assert cosine[5:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (s - 5) / 15)) for s in range(5, 20)])
    constant = _lrs(TrainConfig(epochs=2, warmup_ratio=0.25, scheduler="constant"), 20)
    assert constant[:5] == pytest.approx(warmup) and constant[5:] == pytest.approx([1.0] * 15)
    # Without warm-up the cosine starts at the full rate, stays above the linear decay for the first
    # half and below it for the second, crossing it at mid-way (both 0.5).
    no_warmup = _lrs(TrainConfig(epochs=2, warmup_ratio=0.0, scheduler="cosine"), 20)
    linear = _lrs(TrainConfig(epochs=2, warmup_ratio=0.0, scheduler="linear"), 20)
    assert no_warmup[0] == pytest.approx(1.0) and no_warmup[10] == pytest.approx(linear[10]) == pytest.approx(0.5)
    assert all(c > l for c, l in zip(no_warmup[1:10], linear[1:10]))
    assert all(c < l for c, l in zip(no_warmup[11:], linear[11:]))

def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    save_checkpoint_dir(tmp_path, model, opt, sched, {"next_epoch": 3})
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, 1, 0.5)
    assert load_checkpoint_dir(tmp_path, fresh, fresh_opt, fresh_sched) == {"next_epoch": 3}
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_presets_validate_and_bad_keys_name_the_field():
    for preset in ("tiny", "paper-msed-sentiment", "paper-msed-emotion", "paper-mvsa-single"):
        cfg = load_config(TrainConfig, "train", preset=preset)
        assert cfg.model == "umaf" and cfg.umaf.top_k == 10
    paper = load_config(TrainConfig, "train", preset="paper-msed-sentiment")
    assert paper.umaf.encoder == "roberta-base" and paper.umaf.fusion_layers == 2
    assert load_config(TrainConfig, "train", overrides=["umaf.nrf=false", "umaf.top_k=5"]).umaf.nrf is False
    with pytest.raises(ConfigError, match="umaf.topk"):
        load_config(TrainConfig, "train", overrides=["umaf.topk=5"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(TrainConfig, "train", overrides=["batch_size=1", "num_workers=2"])
    assert TrainConfig().resolved_best_metric("hfm") == "macro_f1"
    assert TrainConfig().resolved_best_metric("msed") == "weighted_f1"
