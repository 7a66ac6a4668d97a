"""Privacy ledger: atomic human-readable privacy.json, spending, budget refusal, NOT PRIVATE."""
import json
import math

import pytest

from dpldm.errors import DpldmError, PrivacyBudgetExceeded
from dpldm.privacy import ledger as ledger_mod
from dpldm.privacy.accountant import epsilon, noise_multiplier_for
from dpldm.privacy.ledger import Ledger


def make(**kw):
    args = dict(delta=1e-5, target_epsilon=2.0, accountant="dpa_rdp", noise_multiplier=1.0,
                sample_rate=0.01, max_grad_norm=1.0, noise_multiplicity=4, dataset_size=10_000,
                expected_batch_size=100.0)
    args.update(kw)
    return Ledger(**args)


def test_save_load_round_trip_is_human_readable_and_leaves_no_temp_file(tmp_path):
    led = make()
    led.spend(50)
    path = led.save(tmp_path)
    led.spend(120)
    led.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy.json"]
    text = path.read_text()
    assert text.startswith("{\n  \"") and "\"noise_multiplier\": 1.0" in text   # indent=2
    back = Ledger.load(tmp_path)
    assert back == led
    assert [h["step"] for h in back.history] == [50, 120]
    assert back.history[1]["epsilon"] == pytest.approx(epsilon(1.0, 0.01, 120, 1e-5, "dpa_rdp"))
    assert back.epsilon == back.history[-1]["epsilon"] and back.steps == 120
    assert Ledger.exists(tmp_path) and not Ledger.exists(tmp_path / "other")


def test_crash_mid_write_leaves_old_file_intact(tmp_path, monkeypatch):
    led = make()
    led.spend(10)
    led.save(tmp_path)
    before = (tmp_path / "privacy.json").read_text()

    def broken_dump(obj, f, **kw):
        f.write('{"half": ')                            # a partial write, then the crash
        raise OSError("disk full")
    monkeypatch.setattr(ledger_mod.json, "dump", broken_dump)
    led.spend(20)
    with pytest.raises(OSError, match="disk full"):
        led.save(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "privacy.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy.json"]
    assert [h["step"] for h in led.history] == [10]    # the failed save left no history entry
    assert Ledger.load(tmp_path).steps == 10


def test_budget_refusal_at_the_calibrated_step_count():
    sigma = noise_multiplier_for(2.0, 0.01, 300, 1e-5, "dpa_rdp")
    led = make(noise_multiplier=sigma)
    led.check_budget(300)                               # exactly the calibrated length fits
    with pytest.raises(PrivacyBudgetExceeded, match="301 steps would spend epsilon"):
        led.check_budget(301)
    assert led.spend(300) <= 2.0


def test_not_private_is_loud_and_never_blocked(tmp_path):
    led = make(noise_multiplier=0.0)
    assert not led.private and any(w.startswith("NOT PRIVATE: noise multiplier is 0") for w in led.warnings)
    led.check_budget(10**6)                              # nothing to protect: no refusal
    assert led.spend(5) == math.inf
    led.save(tmp_path)
    data = json.loads((tmp_path / "privacy.json").read_text())   # strict JSON, no Infinity
    assert data["epsilon"] == "inf" and data["private"] is False
    assert Ledger.load(tmp_path).epsilon == math.inf


def test_spend_never_goes_back_and_resume_checks_the_mechanism():
    led = make()
    led.spend(10)
    with pytest.raises(DpldmError, match="never goes back"):
        led.spend(5)
    led.check_same_mechanism(noise_multiplier=1.0, sample_rate=0.01, accountant="dpa_rdp")
    with pytest.raises(DpldmError, match="noise_multiplier: ledger 1.0, now 1.2"):
        led.check_same_mechanism(noise_multiplier=1.2, sample_rate=0.01)


def test_bad_ledgers_are_one_line_errors(tmp_path):
    with pytest.raises(DpldmError, match="does not exist"):
        Ledger.load(tmp_path)
    (tmp_path / "privacy.json").write_text("{not json")
    with pytest.raises(DpldmError, match="privacy.json is not valid JSON"):
        Ledger.load(tmp_path)
    (tmp_path / "privacy.json").write_text(json.dumps({"delta": 1e-5, "surprise": 1}))
    with pytest.raises(DpldmError, match="missing fields.*noise_multiplier.*unknown fields: \\['surprise'\\]"):
        Ledger.load(tmp_path)
    good = make().to_dict()
    (tmp_path / "privacy.json").write_text(json.dumps({**good, "sample_rate": 3}))
    with pytest.raises(DpldmError, match="bad values.*sample_rate"):
        Ledger.load(tmp_path)
    with pytest.raises(DpldmError, match="delta should be < 1/N"):
        make(delta=1e-3, dataset_size=10_000)


def test_ledgers_as_the_trainer_and_quickstart_write_them(tmp_path):
    """No-DP baseline (marked by the trainer), and a run that touched no private data (ε = 0)."""
    nodp = make(noise_multiplier=0.0, private=False,
                warnings=["NOT PRIVATE: privacy.enabled=false (no clipping, no noise): the No-DP baseline"])
    assert len(nodp.warnings) == 1                      # no duplicate marker
    nodp.steps = 7                                      # the trainer sets steps, never calls spend
    nodp.save(tmp_path / "nodp")
    assert json.loads((tmp_path / "nodp" / "privacy.json").read_text())["epsilon"] == "inf"
    public_only = Ledger(delta=1e-5, target_epsilon=0.0, accountant="none", noise_multiplier=0.0,
                         sample_rate=0.0, max_grad_norm=0.0, noise_multiplicity=0, dataset_size=0,
                         expected_batch_size=0, sampling="none", warnings=["uses no private data"])
    public_only.check_budget(0)
    public_only.save(tmp_path / "pub")
    back = Ledger.load(tmp_path / "pub")
    assert back.private and back.epsilon == 0.0 and back.warnings == ["uses no private data"]
