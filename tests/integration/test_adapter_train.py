"""Adapter training on toy-world pairs: a step learns, DDP equals one process, resume equals a full run."""
from __future__ import annotations

import json

import pytest
import torch

from smallworld_lab.adapter_dataset import write_smallworld_dataset
from concept_attention.training.adapter_data import read_dataset
from concept_attention.training.adapter_train import AdapterTrainer
from concept_attention.sampling.nested_adapter import load_adapter
from support.adapter_training import DDP_SETTINGS, ddp_worker, tiny_frozen, tiny_settings, weights_and_grads


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_smallworld_dataset(tmp_path_factory.mktemp("pairs"), count=6, seed=3, size=64)


@pytest.fixture(scope="module")
def frozen():
    return tiny_frozen()


def test_dataset_of_crops_and_captions(dataset):
    records = read_dataset(dataset)
    assert len(records) == 6
    assert all(r.subject in r.caption and r.crop is not None for r in records)
    (dataset / "bad").mkdir(exist_ok=True)
    (dataset / "bad" / "captions.jsonl").write_text(json.dumps({"image": "x.png", "caption": "a dog", "subject": "cat"}))
    with pytest.raises(ValueError, match="does not contain the subject word"):
        read_dataset(dataset / "bad")


def test_training_writes_a_loadable_adapter(dataset, frozen, tmp_path):
    trainer = AdapterTrainer(frozen, read_dataset(dataset), tiny_settings(steps=2), tmp_path)
    before = {k: v.clone() for k, v in trainer.adapter.state_dict().items()}
    losses = trainer.train()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in trainer.adapter.state_dict().items() if not torch.equal(v, before[k])]
    assert "image_proj.latents" in changed and "ip_adapter.1.to_v_ip.weight" in changed
    adapter = load_adapter(tmp_path / "adapter.safetensors")
    assert adapter.config == trainer.config
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    assert state["step"] == 2 and len(state["history"]) == 2


def test_ddp_two_processes_equal_one_process(dataset, frozen, tmp_path):
    # SGD: Adam's first step is lr * sign(grad), which turns the UNet's float32 rounding that depends
    # on the batch size (about 2e-6 in eps between one batch of 2 and two of 1) into +-lr flips of
    # weights whose gradient is ~0; an SGD step shows the gradient all-reduce itself.
    import safetensors.torch
    import torch.multiprocessing as mp

    result = tmp_path / "ddp.safetensors"
    mp.spawn(ddp_worker, args=(2, str(dataset), str(tmp_path / "rendezvous"), str(result)), nprocs=2)
    single = AdapterTrainer(frozen, read_dataset(dataset), tiny_settings(micro_batch=2, **DDP_SETTINGS))
    single.train(1)
    ddp = safetensors.torch.load_file(str(result))
    reference = weights_and_grads(single)
    assert set(ddp) == set(reference)
    for key, value in reference.items():
        if key.startswith("w."):
            torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-5, msg=key)
        else:  # averaged, not summed: a factor of 2 would be far outside this
            scale = float(value.abs().max())
            assert float((ddp[key] - value).abs().max()) <= 1e-2 * scale + 1e-7, key


def test_resume_equals_an_uninterrupted_run(dataset, frozen, tmp_path):
    records = read_dataset(dataset)
    full = AdapterTrainer(frozen, records, tiny_settings(steps=2))
    full.train()
    first = AdapterTrainer(frozen, records, tiny_settings(steps=2), tmp_path)
    first.train(1)
    resumed = AdapterTrainer(frozen, records, tiny_settings(steps=2), tmp_path)
    resumed.resume(tmp_path)
    assert resumed.step == 1
    resumed.train()
    assert resumed.history == pytest.approx(full.history, rel=1e-6)
    for key, value in full.adapter.state_dict().items():
        torch.testing.assert_close(resumed.adapter.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)
