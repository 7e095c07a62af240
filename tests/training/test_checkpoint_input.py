"""Damaged, foreign or hand-edited checkpoints: `generate`, `evaluate` and `serve` each stop
with one line and exit status 2, naming what is wrong; nothing is written."""

import copy
import json

import pytest
import torch

from t2i.cli import main as cli_main
from t2i.training import checkpoint as ckpt_lib


def damaged(state: dict, change) -> dict:
    state = copy.deepcopy(state)
    change(state)
    return state


def drop(key):
    return lambda s: s.pop(key)


def setitem(path, value):
    def change(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def rename_vocab_head(state):
    state["vocab"][0] = "the"


CASES = {
    "config missing": (drop("config"), "'config' is missing"),
    "config a list": (setitem(["config"], ["model"]), "'config' is missing or not a table"),
    "vocab missing": (drop("vocab"), "'vocab' is missing"),
    "vocab of numbers": (setitem(["vocab"], [0, 1, 2]), "'vocab' is missing or not a list of words"),
    "model missing": (drop("model"), "'model' is missing"),
    "model of strings": (setitem(["model"], {"text.vectors": "x"}), "'model' is missing or not a table of tensors"),
    "no word table": (lambda s: s["model"].pop("text.vectors"), "no 2-D word-vector table"),
    "word table 1-D": (setitem(["model", "text.vectors"], torch.zeros(5)), "no 2-D word-vector table"),
    "vocabulary without <pad>": (rename_vocab_head, "not the padding token '<pad>'"),
    "vocabulary shorter than vectors": (lambda s: s["vocab"].pop(), "but its word table"),
    "negative max_words": (setitem(["data", "max_words"], -3), "data.max_words is -3"),
    "epoch missing": (drop("epoch"), "'epoch' is missing"),
    "another family": (setitem(["config", "model", "family"], "seed"), "weights do not fit the model"),
    "an invalid stored config": (setitem(["config", "model", "family"], "gan"), "its stored config is not valid"),
    "another width": (setitem(["config", "model", "width"], 16), "weights do not fit the model"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_checkpoint_is_one_line_and_exit_2(case, checkpoint, shapes_dir, tmp_path, capsys):
    change, says = CASES[case]
    state = torch.load(checkpoint, weights_only=True)
    bad = tmp_path / "run" / "checkpoint_0" / "model.pt"
    bad.parent.mkdir(parents=True)
    torch.save(damaged(state, change), bad)
    out = tmp_path / "out.png"
    commands = {
        "generate": ["generate", "--checkpoint", str(bad), "a red circle", "--out", str(out)],
        "evaluate": ["evaluate", "--checkpoint", str(bad), "--data", str(shapes_dir), "--max-pairs", "8"],
        "serve": ["serve", "--checkpoint", str(bad), "--port", "1"],  # refused before Ray or a port
    }
    for name, argv in commands.items():
        assert cli_main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and says in err, (name, err)
    assert not out.exists()


def test_a_run_folder_with_a_corrupt_meta_json_is_one_line(checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    for epoch, meta in ((0, "{not json"), (1, json.dumps(["a", "list"])), (2, json.dumps({"epoch": "two"}))):
        folder = run / f"checkpoint_{epoch}"
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(checkpoint.read_bytes())
        (folder / "meta.json").write_text(meta)
        assert cli_main(["generate", "--checkpoint", str(run), "a red circle", "--out", str(tmp_path / "o.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "meta.json" in err and "remove that checkpoint folder" in err, err
        (folder / "meta.json").unlink()
        (folder / "model.pt").unlink()


def test_save_writes_weights_and_meta_whole(checkpoint, tmp_path):
    """Both files appear by rename from a temporary name: a crash mid-write leaves the old ones."""
    loaded = ckpt_lib.load(checkpoint)
    ckpt_lib.save(tmp_path, model=loaded.model, cfg=loaded.config, vocab=loaded.vocab, epoch=4, metrics={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "model.pt"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["epoch"] == 4 and meta["model_bytes"] == (tmp_path / "model.pt").stat().st_size
    assert meta["vocab_digest"] == loaded.vocab.digest()
