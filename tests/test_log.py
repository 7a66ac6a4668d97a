"""dpldm.log: one logging helper, rank-0 aware."""
from dpldm.log import log, rank


def test_log_prints_on_rank_0_only_unless_all_ranks(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    log("zero")
    log("warn", err=True)
    out, err = capsys.readouterr()
    assert out == "zero\n" and err == "warn\n"
    monkeypatch.setenv("RANK", "1")
    assert rank() == 1
    log("hidden")
    log("every rank", all_ranks=True, err=True)
    out, err = capsys.readouterr()
    assert out == "" and err == "every rank\n"
    monkeypatch.delenv("RANK")
    assert rank() == 0
