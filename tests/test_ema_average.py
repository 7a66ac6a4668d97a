"""TailAverage: the uniform average of the last fraction of iterates, resumable, post-processing only."""
import pytest
import torch

from dpldm.errors import DpldmError
from dpldm.models.ema_average import TailAverage


def test_averages_exactly_the_tail_iterates():
    p = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    avg = TailAverage(p, total_steps=10, fraction=0.3)          # steps 8, 9, 10
    for step in range(1, 11):
        p["a"].fill_(step)
        p["b"].fill_(-step)
        avg.update(step, p)
    assert avg.count == 3 and avg.copy_to(p)
    assert torch.allclose(p["a"], torch.full((3,), 9.0)) and torch.allclose(p["b"], torch.full((2, 2), -9.0))


def test_noise_falls_with_averaging_and_nothing_changes_before_the_tail():
    torch.manual_seed(0)
    p = {"w": torch.zeros(10000)}
    avg = TailAverage(p, total_steps=40, fraction=0.5)
    assert not avg.copy_to(p)                                   # nothing averaged yet: unchanged
    for step in range(1, 41):
        p["w"].copy_(1.0 + torch.randn(10000))                  # signal 1, independent noise per step
        avg.update(step, p)
    avg.copy_to(p)
    assert abs(p["w"].mean().item() - 1.0) < 0.01 and 0.18 < p["w"].std().item() < 0.27   # ~1/sqrt(20)


def test_resume_continues_the_sum_and_rejects_another_schedule():
    p = {"w": torch.zeros(2)}
    a = TailAverage(p, total_steps=4, fraction=0.5)
    for step in (1, 2, 3):
        p["w"].fill_(step)
        a.update(step, p)
    b = TailAverage(p, total_steps=4, fraction=0.5)
    b.load_state_dict(a.state_dict())
    p["w"].fill_(4)
    b.update(4, p)
    b.copy_to(p)
    assert torch.allclose(p["w"], torch.full((2,), 3.5))
    with pytest.raises(DpldmError, match="checkpoint averages steps"):
        TailAverage(p, total_steps=8).load_state_dict(a.state_dict())
    with pytest.raises(DpldmError, match="fraction"):
        TailAverage(p, total_steps=8, fraction=0.0)
