"""S_k per IMP round: exact scores on hand-made masks, the round record of Alg. 1 and its resume, the report section."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rtl import cli
from rtl import iterative_pruning as imp_module
from rtl.convert import convert_
from rtl.experiments import protocol
from rtl.experiments.round_similarity import MAX_ROWS, RoundHistory, report_lines, round_masks, round_scores


# -- hand-made masks: 3 tickets, layers a (2 x 2) and b (4,), 3 rounds over two IMP runs (targets 0.5 and 0.75) --------
def _m(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits])


KEYS = [(0.5, 0), (0.5, 1), (0.75, 0)]
# ROUNDS[r][t] = (layer a bits, layer b bits): ticket t's mask after round r (masks only shrink)
ROUNDS = [
    [("1111", "1100"), ("1111", "1100"), ("1111", "0011")],
    [("1100", "1100"), ("1010", "1100"), ("1100", "0011")],
    [("1000", "0100"), ("1000", "0100"), ("0100", "0001")],
]
# Worked by hand from the bits: J = |intersection| / |union| over both layers (global) or one layer, S_k = mean J to
# the other two tickets. Round 0: J01 = 6/6, J02 = J12 = 4/8. Round 1: J01 = 3/5, J02 = 2/6, J12 = 1/7. Round 2:
# J01 = 2/2, J02 = J12 = 0/4.
EXPECTED_SCORES = [
    [0.75, 0.75, 0.5],
    [(3 / 5 + 1 / 3) / 2, (3 / 5 + 1 / 7) / 2, (1 / 3 + 1 / 7) / 2],
    [0.5, 0.5, 0.0],
]
EXPECTED_LAYER_SCORES = [
    {"a": [1.0, 1.0, 1.0], "b": [0.5, 0.5, 0.0]},
    {"a": [2 / 3, 1 / 3, 2 / 3], "b": [0.5, 0.5, 0.0]},  # a: J01 = 1/3, J02 = 1, J12 = 1/3
    {"a": [0.5, 0.5, 0.0], "b": [0.5, 0.5, 0.0]},
]


def _histories(skip=()):
    """One RoundHistory per ticket of the hand-made case; ``skip`` = {(ticket, round)} left unrecorded."""
    out = []
    for t in range(3):
        history = RoundHistory({"a": torch.ones(2, 2, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)})
        for r, key in enumerate(KEYS):
            if (t, r) not in skip:
                a, b = ROUNDS[r][t]
                history.record(key, {"a": _m(a).reshape(2, 2), "b": _m(b)})
        out.append(history)
    return out


def test_per_round_scores_are_exact_on_hand_made_masks():
    rounds = round_scores(_histories())
    assert [e["round"] for e in rounds] == [0, 1, 2]
    assert [(e["target"], e["target_round"]) for e in rounds] == KEYS
    assert [e["sparsity"] for e in rounds] == [0.25, 0.5, 0.75]
    for entry, scores, layers in zip(rounds, EXPECTED_SCORES, EXPECTED_LAYER_SCORES):
        assert entry["scores"] == pytest.approx(scores, abs=1e-12)
        assert set(entry["layer_scores"]) == {"a", "b"}
        for name, expected in layers.items():
            assert entry["layer_scores"][name] == pytest.approx(expected, abs=1e-12)
    json.dumps(rounds)  # json-ready, as metrics.json stores it


def test_histories_replay_every_round_and_align_tickets():
    histories = _histories()
    for r, (key, masks) in enumerate(round_masks(histories)):
        assert key == KEYS[r]
        for t in range(3):
            assert torch.equal(masks["a"][t].flatten(), _m(ROUNDS[r][t][0]))
            assert torch.equal(masks["b"][t], _m(ROUNDS[r][t][1]))
    # a ticket without a round (a structured ticket that stopped) keeps its mask of the round before
    _, masks = list(round_masks(_histories(skip={(2, 1)})))[1]
    assert torch.equal(masks["b"][2], _m(ROUNDS[0][2][1]))
    # the history of an incomplete extraction gives no record rather than a wrong one
    assert round_scores(_histories()[:2] + [None]) is None and round_scores(_histories()[:1]) is None


def test_truncate_and_state_round_trip():
    history = _histories()[1]
    assert history.truncate((0.5, 1)) and history.keys == [(0.5, 0)]
    assert torch.equal(history.mask_after(0)["a"].flatten(), _m(ROUNDS[0][1][0]))
    assert torch.equal(history.mask_after(-1)["a"], torch.ones(2, 2, dtype=torch.bool))
    for r in (1, 2):  # recorded again, the rounds give the same state as the first time
        history.record(KEYS[r], {"a": _m(ROUNDS[r][1][0]).reshape(2, 2), "b": _m(ROUNDS[r][1][1])})
    again = RoundHistory.from_state(history.state_dict())
    reference = _histories()[1]
    assert again.keys == reference.keys
    assert all(torch.equal(again.kept[n], reference.kept[n]) for n in ("a", "b"))


def test_report_table_of_many_rounds_keeps_each_targets_last():
    rounds = [
        {"round": i, "target": 0.5 if i < 31 else 0.9, "sparsity": i / 200, "scores": [0.9, 0.8], "layer_scores": {}}
        for i in range(200)
    ]

    def shown(entries):
        return [int(line.split("|")[1]) for line in report_lines(entries) if line[:3].strip("| ").isdigit()]

    assert shown(rounds[:3]) == [0, 1, 2]  # few rounds: every one
    many = shown(rounds)  # many: about MAX_ROWS, in order, with each target's last round
    assert len(many) <= MAX_ROWS + 2 and {0, 30, 199} <= set(many) and many == sorted(many)
    assert "rounds are shown" in "\n".join(report_lines(rounds))


# -- Alg. 1's round record: extract_masks on a tiny routed model, interrupted anywhere and resumed --------------------
def _tiny_task():
    return SimpleNamespace(settings=SimpleNamespace(prune_count=0, prune_fraction=0.4, granularity="unstructured"))


def _make_train(calls, stop_at=None):
    """``make_train_fn``: each "training" moves the weights by noise seeded from (target, ticket, round), so every
    ticket gets its own masks and a redone round the same ones; it raises KeyboardInterrupt at call ``stop_at``."""

    def make(target):
        def train(model, ticket, round_idx):
            calls[0] += 1
            if calls[0] == stop_at:
                raise KeyboardInterrupt
            gen = torch.Generator().manual_seed(int(target * 1000) * 10_000 + ticket * 100 + round_idx)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen))

        return train

    return make


def _extract(checkpoint_dir, make):
    torch.manual_seed(0)
    model = convert_(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), 3)
    return protocol.extract_masks(
        _tiny_task(), model, [0.3, 0.85], make, checkpoint_dir, progress=False, record_rounds=True
    )


def _state(out):
    return [(h.keys, {n: k.tolist() for n, k in h.kept.items()}) for h in out["histories"]]


def test_extraction_records_every_round_of_every_ticket(tmp_path):
    out = _extract(str(tmp_path / "imp"), _make_train([0]))
    # 0.3 in one round (0.4 clipped), 0.85 in three (0.3 + 0.4 * 0.7 = 0.58, 0.748, then clipped): four per ticket
    assert all(h.keys == [(0.3, 0), (0.85, 0), (0.85, 1), (0.85, 2)] for h in out["histories"])
    rounds = round_scores(out["histories"])
    for entry in rounds:
        logged = [e for e in out["log"] if (e["target"], e["round"]) == (entry["target"], entry["target_round"])]
        assert [e["sparsity"][e["ticket"]] for e in logged] == pytest.approx(entry["ticket_sparsity"])
    for history, t in zip(out["histories"], range(3)):  # the last round of each run is the target's mask
        for index, key in ((0, "0.3"), (3, "0.85")):
            final = history.mask_after(index)
            assert all(torch.equal(final[n], out["masks"][key][n][t]) for n in final)
    assert _state(_extract(None, _make_train([0]))) == _state(out)  # the same without checkpoints


@pytest.mark.parametrize("where", ["in_training", "after_checkpoint"])
def test_round_record_survives_an_interruption_anywhere(tmp_path, monkeypatch, where):
    """Interrupted inside any round's training, or after any round's checkpoint (before the next training), the
    resumed extraction records exactly the rounds of an uninterrupted one."""
    reference = _state(_extract(None, _make_train([0])))
    real_run = imp_module.IMP.run
    for stop in range(1, 13):  # 3 tickets x 4 rounds
        folder = str(tmp_path / f"{where}{stop}")
        if where == "in_training":
            with pytest.raises(KeyboardInterrupt):
                _extract(folder, _make_train([0], stop_at=stop))
        else:
            finished = [0]

            def stop_after(self, finished=finished, stop=stop):
                def callback(imp, entry):
                    finished[0] += 1
                    if finished[0] == stop:
                        raise KeyboardInterrupt

                self.callbacks = list(self.callbacks) + [callback]
                return real_run(self)

            monkeypatch.setattr(imp_module.IMP, "run", stop_after)
            with pytest.raises(KeyboardInterrupt):
                _extract(folder, _make_train([0]))
            monkeypatch.setattr(imp_module.IMP, "run", real_run)
        assert _state(_extract(folder, _make_train([0]))) == reference, stop


def test_a_resume_without_the_rounds_before_it_gives_no_record(tmp_path):
    """IMP checkpoints without a round history beside them (a run begun by an older rtl): no record, no wrong one."""
    folder = tmp_path / "imp"
    with pytest.raises(KeyboardInterrupt):  # at ticket 1's first training: ticket 0 is done, 3 rounds to 0.85
        _extract(str(folder), _make_train([0], stop_at=5))
    for path in folder.rglob("rounds.pt"):
        path.unlink()
    out = _extract(str(folder), _make_train([0]))
    # ticket 0's rounds (0.85, 0) and (0.85, 1) are lost: the checkpoint's mask (its last round) is all there is
    assert out["histories"][0] is None and out["histories"][1] is not None
    assert round_scores(out["histories"]) is None


# -- `rtl run` end to end ----------------------------------------------------------------------------------------------
ARGS = ["digits-environments", "--quick", "--sparsities", "0.5,0.9", "--seed", "3"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, tiny_budget):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert cli.main(["run"] + ARGS + tiny_budget + ["--out", str(out)]) == 0
    return out


def test_run_records_s_k_per_imp_round_and_reports_it(whole_run, tmp_path):
    metrics = json.loads((whole_run / "metrics.json").read_text())
    config = json.loads((whole_run / "config.json").read_text())
    rounds = metrics["rounds"]
    logged = json.loads((whole_run / "logs" / "rtl_masks_rounds.json").read_text())
    schedule = sorted({(e["target"], e["round"]) for e in logged})
    assert [(e["target"], e["target_round"]) for e in rounds] == schedule  # one entry per round, in order
    assert len(schedule) == 4 and [e["round"] for e in rounds] == list(range(4))  # 0.5; 0.75, 0.875, 0.9
    for before, after in zip(rounds, rounds[1:]):  # density never rises from one round to the next
        assert after["sparsity"] >= before["sparsity"]
        assert all(a >= b for a, b in zip(after["ticket_sparsity"], before["ticket_sparsity"]))
    prunable, T = config["prunable_weights"], config["num_tickets"]
    for key in ("0.5", "0.9"):  # the last round of a run is the mask that joint retraining used
        last = [e for e in rounds if e["target"] == float(key)][-1]
        assert last["ticket_sparsity"] == pytest.approx([round(float(key) * prunable) / prunable] * T)
        assert last["scores"] == pytest.approx(metrics["sparsities"][key]["rtl"]["similarity"])
    for entry in rounds:
        assert len(entry["scores"]) == T and all(len(v) == T for v in entry["layer_scores"].values())
    report = (whole_run / "report.md").read_text()
    assert "## S_k per IMP round" in report and "similarity_per_round.png" in report
    assert (whole_run / "similarity_per_round.png").is_file()

    # an older run's metrics.json, without "rounds", still renders: the section is left out
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(whole_run / "config.json", old / "config.json")
    del metrics["rounds"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    assert cli.main(["report", str(old)]) == 0
    report = (old / "report.md").read_text()
    assert "## Collapse study" in report and "S_k per IMP round" not in report
    assert not (old / "similarity_per_round.png").exists()


def test_resumed_run_gives_the_same_rounds_record(whole_run, tmp_path, monkeypatch, tiny_budget):
    real_run = imp_module.IMP.run
    finished = [0]

    def stop_after_two_rounds(self):
        def callback(imp, entry):  # after the round's checkpoint, before the next training records it
            finished[0] += 1
            if finished[0] == 2:
                raise KeyboardInterrupt

        self.callbacks = list(self.callbacks) + [callback]
        return real_run(self)

    # the single-mask stage runs first and has its own IMP: count the RTL extraction's rounds only
    real_extract = protocol.extract_masks

    def extract(*args, record_rounds=False, **kwargs):
        if record_rounds:
            monkeypatch.setattr(imp_module.IMP, "run", stop_after_two_rounds)
        return real_extract(*args, record_rounds=record_rounds, **kwargs)

    monkeypatch.setattr(protocol, "extract_masks", extract)
    part = tmp_path / "part"
    assert cli.main(["run"] + ARGS + tiny_budget + ["--out", str(part)]) == 130
    assert (part / "stages" / "rtl_masks_imp" / "ticket0" / "rounds.pt").is_file()
    monkeypatch.setattr(imp_module.IMP, "run", real_run)
    monkeypatch.setattr(protocol, "extract_masks", real_extract)
    assert cli.main(["run"] + ARGS + tiny_budget + ["--resume", str(part)]) == 0
    whole = json.loads((whole_run / "metrics.json").read_text())
    resumed = json.loads((part / "metrics.json").read_text())
    assert resumed["rounds"] == whole["rounds"]
