"""Two CPU processes (gloo) train like one process on the whole batch."""
import copy
import os

import torch
import torch.multiprocessing as mp

from acelora.testing import rel_err
from acelora.data.collate import ImageTextCollator
from acelora.train.loop import Trainer
from acelora.train.settings import TrainConfig
from acelora.train.testing import ToyCLIP, ToyPairs, ddp_grad_worker


def _single_process(case, tmp_path):
    model = ToyCLIP(dropout=0.0)
    model.load_state_dict(case["state"])
    data = ToyPairs(case["n"], seed=case["seed"])
    cfg = TrainConfig(output_dir=str(tmp_path / "single"), progress=False, tensorboard=False,
                      batch_size=case["n"], grad_accum=1, lr=1e-3, warmup_steps=0, epochs=1)
    trainer = Trainer(model, data, cfg)
    loss = trainer.backward(ImageTextCollator(model.tokenizer)([data[i] for i in range(case["n"])]))
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_two_gloo_ranks_match_one_process(tmp_path):
    torch.manual_seed(0)
    state = copy.deepcopy(ToyCLIP(dropout=0.0).state_dict())
    # A plain case, and one where each rank also accumulates over 2 micro-batches.
    cases = [{"state": state, "n": 16, "seed": 4, "grad_accum": 1},
             {"state": state, "n": 16, "seed": 9, "grad_accum": 2}]
    torch.save(cases, tmp_path / "cases.pt")
    init_file = str(tmp_path / "rendezvous")
    mp.spawn(ddp_grad_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for i, case in enumerate(cases):
        ref_loss, ref_grads = _single_process(case, tmp_path)
        for r in range(2):
            got = ranks[r][i]
            # Every rank computes the loss of the gathered global batch.
            assert abs(got["loss"].item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
            for name, g in ref_grads.items():
                assert rel_err(got["grads"][name], g) < 1e-5, (i, r, name)
        # DDP leaves identical gradients on both ranks.
        for name in ref_grads:
            assert torch.equal(ranks[0][i]["grads"][name], ranks[1][i]["grads"][name])
    assert not os.path.exists(tmp_path / "out0" / "checkpoints")  # backward only, nothing saved
