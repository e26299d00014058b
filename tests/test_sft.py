"""SFT stage smoke runs (full and LoRA) on a tiny model, and exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain import engine
from posttrain.config import ConfigError, load_config
from posttrain.stages.sft import SFTConfig, train


def cfg_for(model_dir, data, out, *extra):
    return load_config(SFTConfig, None, [
        f"model.name_or_path={model_dir}", f"data.train={data}", f"output_dir={out}", "batch_size=4",
        "lr=1e-3", "max_steps=6", "tensorboard=false", "data.eval_fraction=0.1", *extra,
    ])


def test_full_finetune_learns_and_saves_hf_dir(tiny_model_dir, chat_file, tmp_path):
    res = train(cfg_for(tiny_model_dir, chat_file, tmp_path / "run", "max_steps=12"))
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss/train"] for m in metrics if "loss/train" in m]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert any("loss/eval" in m for m in metrics) and res.eval_loss is not None
    for f in ("config.yaml", "manifest.json", "model/model.safetensors", "model/config.json",
              "model/tokenizer.json", "model/chat_template.jinja"):
        assert (tmp_path / "run" / f).exists(), f
    # the checkpoint is a plain HF directory transformers loads without posttrain
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert reloaded.config.num_hidden_layers == 2


def test_mixed_precision_learns_and_saves_float32(tiny_model_dir, chat_file, tmp_path):
    """Mixed precision trains float32 weights (saved as float32) and tracks the float32 run."""
    dtype, runs = "bf16-mixed", {}
    for d in (dtype, "float32"):
        train(cfg_for(tiny_model_dir, chat_file, tmp_path / d, f"model.dtype={d}"))
        runs[d] = [m["loss/train"] for m in engine.read_metrics(tmp_path / d) if "loss/train" in m]
    assert runs[dtype][-1] < runs[dtype][0]
    assert runs[dtype] == pytest.approx(runs["float32"], rel=0.05)
    saved = load_file(tmp_path / dtype / "model" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())


def test_lora_saves_adapter_and_merged(tiny_model_dir, chat_file, tmp_path):
    res = train(cfg_for(tiny_model_dir, chat_file, tmp_path / "run", "model.lora=true", "model.lora_r=4",
                        "merge_lora=true", "max_steps=3", "batching=flatten"))
    assert (res.model_dir / "adapter_config.json").is_file()
    assert (res.model_dir / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "model-merged" / "model.safetensors").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, str(res.model_dir))  # loads with peft alone


def _interrupt_after(monkeypatch, n):
    real = engine.Trainable.step
    calls = {"n": 0}

    def step(self, max_grad_norm):
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += 1
        return real(self, max_grad_norm)

    monkeypatch.setattr(engine.Trainable, "step", step)


@pytest.mark.parametrize("extra", [[], ["model.lora=true", "model.lora_r=4", "model.lora_dropout=0.2"]],
                         ids=["full", "lora-dropout"])
def test_resume_reaches_same_weights(tiny_model_dir, chat_file, tmp_path, monkeypatch, extra):
    ref = train(cfg_for(tiny_model_dir, chat_file, tmp_path / "ref", "save_every=2", *extra))
    with monkeypatch.context() as m:
        _interrupt_after(m, 5)  # dies during step 5 (after the step-4 checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train(cfg_for(tiny_model_dir, chat_file, tmp_path / "cut", "save_every=2", *extra))
    assert engine.latest_checkpoint(tmp_path / "cut").name == "step-4"
    res = train(cfg_for(tiny_model_dir, chat_file, tmp_path / "cut", "save_every=2", "resume=true", *extra))
    name = "adapter_model.safetensors" if extra else "model.safetensors"
    a, b = load_file(str(ref.model_dir / name)), load_file(str(res.model_dir / name))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ref_losses = [m.get("loss/train") for m in engine.read_metrics(tmp_path / "ref")]
    cut_losses = [m.get("loss/train") for m in engine.read_metrics(tmp_path / "cut")]
    assert ref_losses == cut_losses  # the resumed run logs each step once, with the same values


def test_partial_checkpoint_is_never_loaded(tmp_path):
    ck = tmp_path / "checkpoints"
    (ck / "step-2").mkdir(parents=True)
    (ck / "step-2" / "trainer_state.json").write_text('{"step": 2}')
    (ck / ".tmp-step-4-123").mkdir()  # a write that was killed
    (ck / "step-6").mkdir()  # no trainer_state.json: incomplete
    assert engine.latest_checkpoint(tmp_path).name == "step-2"


def test_a_finished_run_is_not_started_over_by_accident(tiny_model_dir, chat_file, tmp_path):
    """A fresh run in a directory holding a finished one is refused (its model would be
    replaced, and its checkpoints continued by a later resume), as is a run of another stage;
    overwrite=true starts over with the old checkpoints gone."""
    out = tmp_path / "run"
    train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=2"))
    before = (out / "model" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"holds a sft run \(model/, checkpoints/step-2\): pass resume=true"):
        train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=1", "lr=2e-3"))
    assert (out / "model" / "model.safetensors").read_bytes() == before
    with pytest.raises(ConfigError, match="holds a sft run .*; a dpo run needs a directory of its own"):
        engine.check_run_dir(out, "dpo", resume=True, overwrite=False)
    train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=1", "overwrite=true"))
    assert [c.name for c in engine.checkpoints(out)] == ["step-1"]
    assert (out / "model" / "model.safetensors").read_bytes() != before


def test_overwrite_leaves_none_of_the_old_model(tiny_model_dir, chat_file, tmp_path):
    """A LoRA run overwritten by full fine-tuning: model/ holds the new weights alone (an old
    adapter_config.json beside them made every loader load the old adapter)."""
    from posttrain.models import load_model

    out = tmp_path / "run"
    train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=1", "model.lora=true", "model.lora_r=4",
                  "merge_lora=true"))
    train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=1", "overwrite=true"))
    assert not (out / "model" / "adapter_config.json").exists() and not (out / "model-merged").exists()
    assert not hasattr(load_model(out / "model"), "peft_config")
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    # starting over from the run's own model: it is not deleted before it is loaded
    train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=1", "overwrite=true",
                  f"model.name_or_path={out / 'model'}"))
    assert (out / "model" / "model.safetensors").is_file()


def test_a_checkpoint_written_again_is_replaced_whole(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    """A resumed finished run writes its last checkpoint again: killed while the old one goes,
    the directory named step-N is still the old complete one (it was deleted file by file)."""
    out = tmp_path / "run"
    train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=2"))
    old = (out / "checkpoints" / "step-2" / "model.safetensors").read_bytes()

    def killed(path, *a, **k):  # the first file deleted, then the process is gone
        (Path(path) / "model.safetensors").unlink(missing_ok=True)
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(engine.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=2", "resume=true"))
    monkeypatch.undo()
    ckpt = engine.latest_checkpoint(out)
    assert ckpt.name == "step-2" and (ckpt / "model.safetensors").read_bytes() == old
    # killed between the two renames (the old one aside, the new one not yet in): put back on resume
    real_replace = engine.os.replace

    def killed_between(src, dst):
        if Path(dst).name == "step-2" and not Path(dst).exists() and ".tmp-step" in str(src):
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(engine.os, "replace", killed_between)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=2", "resume=true"))
    monkeypatch.undo()
    assert engine.latest_checkpoint(out) is None  # only .old-step-2-* is left ...
    engine.recover_checkpoints(out)  # ... which a resume puts back first
    assert (engine.latest_checkpoint(out) / "model.safetensors").read_bytes() == old


def test_starting_from_a_lora_adapter(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    """From another run's adapter: full fine-tuning trains the model it makes; LoRA continues it
    (other adapter settings are a config error: a new adapter would be saved against the bare
    base); its recorded base path is absolute, so it loads from any working directory."""
    from posttrain.models import ModelConfig, count_parameters, load_model, prepare_model

    monkeypatch.chdir(tiny_model_dir.parent)
    res = train(cfg_for(tiny_model_dir.name, chat_file, tmp_path / "run", "max_steps=2", "model.lora=true",
                        "model.lora_r=4", "model.lora_alpha=8"))
    monkeypatch.chdir(tmp_path)
    adapter = json.loads((res.model_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    merged = load_model(res.model_dir, "float32", inference=True)
    ids = torch.tensor([[1, 5, 9, 14]])
    full, _, _ = prepare_model(ModelConfig(name_or_path=str(res.model_dir), dtype="float32"))
    trained, total = count_parameters(full)
    assert trained == total and not hasattr(full, "peft_config")
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, merged(ids).logits, atol=1e-5)
    lora, _, _ = prepare_model(ModelConfig(name_or_path=str(res.model_dir), dtype="float32", lora=True, lora_r=4,
                                           lora_alpha=8))
    assert lora.peft_config["default"].r == 4 and count_parameters(lora)[0] < total
    with pytest.raises(ConfigError, match="is a LoRA adapter .*model.lora_r=4 model.lora_alpha=8"):
        prepare_model(ModelConfig(name_or_path=str(res.model_dir), lora=True, lora_r=8))
    with pytest.raises(ConfigError, match="float16 weights cannot be trained"):
        ModelConfig(dtype="float16").validate()


def test_resuming_with_other_model_settings_is_a_config_error(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=2"))
    with pytest.raises(ConfigError, match="written by full fine-tuning, and this run is set up for LoRA"):
        train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=3", "resume=true", "model.lora=true"))
    lora = tmp_path / "lora"
    train(cfg_for(tiny_model_dir, chat_file, lora, "max_steps=2", "model.lora=true", "model.lora_r=4"))
    with pytest.raises(ConfigError, match="holds a LoRA adapter of r=4, .* set up for r=8"):
        train(cfg_for(tiny_model_dir, chat_file, lora, "max_steps=3", "resume=true", "model.lora=true",
                      "model.lora_r=8"))


def test_a_non_finite_loss_stops_the_run_before_the_weights_change(tiny_model_dir, chat_file, tmp_path):
    """lr=1e30 sends the weights to ~1e30 in the first step and the loss to inf/NaN after it:
    the run stops there with an error naming the step, and no model is saved."""
    with pytest.raises(engine.TrainingError, match=r"optimizer step [23]: the gradient norm is (nan|inf)"):
        train(cfg_for(tiny_model_dir, chat_file, tmp_path / "run", "lr=1e30", "warmup_ratio=0", "max_steps=4"))
    assert not (tmp_path / "run" / "model").exists()


def test_keep_last_prunes(tiny_model_dir, chat_file, tmp_path):
    train(cfg_for(tiny_model_dir, chat_file, tmp_path / "run", "save_every=1", "keep_last=2"))
    assert [c.name for c in engine.checkpoints(tmp_path / "run")] == ["step-5", "step-6"]


def test_sparse_tied_embedding_grad_is_the_dense_one(tiny_model_dir):
    """With the input embedding tied to the LM head, its gradient is taken sparse and added into
    the head's dense one: the same dense gradient as without, which AdamW then takes."""
    from posttrain.logprobs import token_logprobs
    from posttrain.models import load_model

    ids = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for sparse in (False, True):
        model = load_model(tiny_model_dir, "float32")
        assert engine.sparse_tied_embedding_grad(model) if sparse else True
        for _ in range(2):  # two micro-batches accumulate
            (-token_logprobs(model, ids, ids).sum()).backward()
        g = model.get_input_embeddings().weight.grad
        assert not g.is_sparse
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("epochs,accum", [(1, 2), (2, 3), (1.5, 4), (1, 1)])
def test_a_run_in_epochs_trains_each_row_once_an_epoch(epochs, accum):
    """Steps of grad_accum micro-batches cover the planned epochs exactly: the last step is
    short when the micro-batches do not fill it (rows of a further epoch were taken before)."""
    cfg = load_config(SFTConfig, None, [f"epochs={epochs}", f"grad_accum={accum}", "batch_size=2"])
    batches = engine.EpochBatches.for_config([10, 20, 30, 40, 50, 60, 70, 80, 90], cfg)  # 5 batches an epoch
    steps = cfg.total_steps(batches.per_epoch)
    seen = [i for s in range(1, steps + 1) for idx in batches.for_step(s, accum) for i in idx]
    assert all(batches.for_step(s, accum) for s in range(1, steps + 1))
    whole, part = divmod(epochs * 5, 5)
    counts = [seen.count(i) for i in range(9)]
    assert sum(len(batches[m]) for m in range(math.ceil(epochs * 5))) == len(seen)  # no batch past the plan
    if not part:
        assert counts == [whole] * 9
    assert max(counts) - min(counts) <= 1
    unbounded = engine.EpochBatches([10] * 9, 2, 0)  # max_steps: the stream goes on as long as asked
    assert len(unbounded.for_step(3, 4)) == 4


def test_resume_refuses_other_batches_or_fewer_steps_and_logs_a_finished_runs_eval_once(tiny_model_dir, chat_file,
                                                                                       tmp_path):
    """A checkpoint's data position is that of its own batch size, accumulation and seed: resuming
    with others is an error, as is a max_steps below the checkpoint's step; resuming a finished
    run evaluates it again without a second eval record."""
    from posttrain.config import ConfigError

    out = tmp_path / "run"
    train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=4", "save_every=2", "eval_every=0"))
    evals = lambda: [r["step"] for r in engine.read_metrics(out) if "loss/eval" in r]
    assert evals() == [4]
    train(cfg_for(tiny_model_dir, chat_file, out, "max_steps=4", "save_every=2", "eval_every=0", "resume=true"))
    assert evals() == [4]
    for extra, msg in ((["batch_size=2"], "written with batch_size=4; this run has batch_size=2"),
                       (["seed=7"], "written with seed=0; this run has seed=7"),
                       (["max_steps=3"], "is at step 4, past this run's 3 steps")):
        args = ["max_steps=4", "save_every=2", "eval_every=0", "resume=true", *extra]
        with pytest.raises(ConfigError, match=msg):
            train(cfg_for(tiny_model_dir, chat_file, out, *args))
