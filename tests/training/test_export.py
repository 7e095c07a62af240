"""`t2i export`: safetensors + config.json + vocab.json that generate, evaluate and serve
load like the checkpoint, and clear errors for a taken folder or a damaged export."""

import json

import pytest
import torch
from safetensors.torch import load_file

from t2i.cli import main as cli_main
from t2i.generation.generate import sample_prompts
from t2i.serving.service import CaptionGenerator
from t2i.training import checkpoint as ckpt_lib
from t2i.training import export as export_lib

PROMPTS = ["a small red circle in the top left corner", "a big blue square"]


def test_an_export_draws_what_its_checkpoint_draws(checkpoint, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli_main(["export", "--checkpoint", str(checkpoint.parent), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["epoch"] == 2 and summary["family"] == "cvae"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    info = json.loads((out / "config.json").read_text())
    assert info["format"] == export_lib.FORMAT and info["config"]["model"]["text_encoder"] == "gru"
    original = ckpt_lib.load(checkpoint)
    weights = load_file(out / "model.safetensors")  # plain safetensors: any reader gets the tensors
    assert weights.keys() == original.model.state_dict().keys()
    assert json.loads((out / "vocab.json").read_text()) == list(original.vocab.words)

    exported = ckpt_lib.load(out)
    assert torch.equal(sample_prompts(exported.model, exported.vocab, PROMPTS, 3, 32, seed=5),
                       sample_prompts(original.model, original.vocab, PROMPTS, 3, 32, seed=5))
    for source, png in ((checkpoint, tmp_path / "a.png"), (out, tmp_path / "b.png")):
        assert cli_main(["generate", "--checkpoint", str(source), "--out", str(png), *PROMPTS]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    served = CaptionGenerator(str(out), device="cpu")
    assert served.public_facts["run"] == "exported" and served.public_facts["epoch"] == 3


def test_export_refuses_a_taken_folder_and_a_damaged_export_is_named(checkpoint, tmp_path, capsys):
    out = tmp_path / "exported"
    ckpt_lib.export(checkpoint, str(out))
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(ckpt_lib.CheckpointError, match="damaged t2i export: model.safetensors is not a readable"):
        ckpt_lib.load(out)
    ckpt_lib.export(checkpoint, str(tmp_path / "again"))
    (tmp_path / "again" / "config.json").unlink()  # an export interrupted before its last file
    with pytest.raises(ckpt_lib.CheckpointError, match="config.json is missing"):
        ckpt_lib.load(tmp_path / "again")
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "again"), "--out", str(tmp_path / "x.png"),
                     "a red circle"]) == 2
    assert "damaged t2i export" in capsys.readouterr().err
