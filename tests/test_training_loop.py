"""The training loop on tiny random models: learning, accumulation, the
optimizer, schedules, clipping, the non-finite guard, exact resume, the
selective-logits loss and config validation."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import _get_classes

from mlxtune.data.batch import Batch
from mlxtune.errors import FailedPrecondition, InvalidArgument
from mlxtune.testing.random_models import random_weights, tiny_config
from mlxtune.training.checkpointing import enable_gradient_checkpointing
from mlxtune.training.config import TrainingConfig
from mlxtune.training.loop import Trainer
from mlxtune.training.loss import MaskedLoss, bucket_size, find_output_head
from mlxtune.training.metrics import NonFiniteLoss, TrainingCallbacks
from mlxtune.training.optim import build_optimizer, learning_rate_at
from mlxtune.training.state import (
    load_training_state,
    restore_trainable_weights,
    save_training_state,
)

VOCAB = 512
_BASE_WEIGHTS: dict[str, dict] = {}


def build_model(family: str = "llama", *, dropout: float = 0.0, lora_seed: int = 1,
                config: dict | None = None) -> nn.Module:
    """A tiny random model with LoRA (rank 8) on every block, base frozen, the
    way mlx-lm's LoRA entry point sets it up."""
    config = config or tiny_config(family, vocab_size=VOCAB)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    key = config["model_type"]
    if key not in _BASE_WEIGHTS:
        _BASE_WEIGHTS[key] = random_weights(config, seed=0)
    model.load_weights(list(_BASE_WEIGHTS[key].items()))
    model.freeze()
    mx.random.seed(lora_seed)
    linear_to_lora_layers(model, len(model.layers),
                          {"rank": 8, "scale": 20.0, "dropout": dropout})
    mx.eval(model.parameters())
    return model


def cycle_batch(index: int, batch_size: int = 4, length: int = 16, cycle: int = 8) -> Batch:
    """Sequences counting through ``cycle`` tokens: next = previous + 1 (mod cycle)."""
    rng = np.random.default_rng(index)
    start = rng.integers(0, cycle, size=(batch_size, 1))
    tokens = (3 + (start + np.arange(length)) % cycle).astype(np.int32)
    mask = np.ones((batch_size, length), np.float32)
    mask[:, 0] = 0
    return Batch(tokens, mask, np.full(batch_size, length, np.int32))


def random_batch(seed: int, batch_size: int = 2, length: int = 12) -> Batch:
    """Random tokens, ragged lengths and a prompt/completion style mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(batch_size, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, size=batch_size).astype(np.int32)
    mask = np.zeros((batch_size, length), np.float32)
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
        mask[i, rng.integers(1, n):n] = 1.0
    return Batch(tokens, mask, lengths)


def config(**overrides) -> TrainingConfig:
    """Small fast defaults: eager, no validation, checkpoints only at the end."""
    base = dict(max_steps=4, learning_rate=3e-3, compile=False, eval_every_steps=0,
                save_every_steps=0)
    base.update(overrides)
    return TrainingConfig(**base)


def trainable(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def recorder():
    steps, evals, saves = [], [], []
    callbacks = TrainingCallbacks(on_step=steps.append, on_eval=evals.append,
                                  on_checkpoint=lambda *args: saves.append(args))
    return callbacks, steps, evals, saves


# ---- learning ---------------------------------------------------------------

def test_loss_falls_on_a_learnable_task():
    callbacks, steps, evals, saves = recorder()
    validation = [cycle_batch(10**6)]
    model = build_model()
    trainer = Trainer(model, config(max_steps=30, warmup_steps=2, eval_every_steps=15),
                      cycle_batch, batches_per_epoch=100, validation_batches=validation,
                      callbacks=callbacks)
    before = trainer.evaluate().eval_loss
    result = trainer.run()
    assert before > 6.0  # about ln(512): nothing learned yet
    # A baseline at step 0, then every 15 steps.
    assert [e.step for e in evals] == [0, 15, 30]
    assert evals[0].eval_loss == pytest.approx(before, rel=1e-6)
    assert evals[-1].eval_loss < before - 0.8
    assert result.step == 30 and not result.stopped and result.skipped_steps == 0
    assert [s.step for s in steps] == list(range(1, 31))
    assert steps[-1].trained_tokens == 30 * 4 * 15
    assert steps[-1].epoch == pytest.approx(0.3)
    assert all(s.tokens_per_second > 0 and s.peak_memory_bytes > 0 for s in steps)
    assert [s[0] for s in saves] == [30] and saves[0][2].is_final


# ---- gradient accumulation ------------------------------------------------------

def test_accumulating_two_micro_batches_equals_one_double_batch():
    first, second = random_batch(1, batch_size=2), random_batch(2, batch_size=2)
    assert first.num_supervised != second.num_supervised  # token weighting matters
    double = Batch(np.concatenate([first.tokens, second.tokens]),
                   np.concatenate([first.loss_mask, second.loss_mask]),
                   np.concatenate([first.lengths, second.lengths]))
    # SGD keeps the update proportional to the gradient (Adam's first step would hide it).
    common = dict(max_steps=1, optimizer="sgd", learning_rate=0.5, max_grad_norm=0.0)
    runs = []
    for cfg, data in ((config(gradient_accumulation_steps=2, batch_size=2, **common),
                       [first, second]),
                      (config(batch_size=4, **common), [double])):
        callbacks, steps, _, _ = recorder()
        model = build_model()
        start = trainable(model)
        Trainer(model, cfg, lambda i, data=data: data[i], batches_per_epoch=len(data),
                callbacks=callbacks).run()
        after = trainable(model)
        runs.append((steps[0], {k: after[k] - start[k] for k in after}))
    (acc_step, acc_update), (one_step, one_update) = runs
    assert acc_step.loss == pytest.approx(one_step.loss, rel=1e-5)
    assert acc_step.grad_norm == pytest.approx(one_step.grad_norm, rel=1e-4)
    assert acc_step.trained_tokens == one_step.trained_tokens == double.num_supervised
    assert max(np.abs(u).max() for u in one_update.values()) > 0
    for name, update in one_update.items():
        np.testing.assert_allclose(acc_update[name], update, rtol=1e-4, atol=1e-7)


# ---- optimizer and schedule -----------------------------------------------------

def test_adamw_uses_textbook_bias_correction_by_default():
    lr, wd, b1, b2, eps = 0.1, 0.01, 0.9, 0.999, 1e-8
    cfg = TrainingConfig(learning_rate=lr, lr_schedule="constant")
    optimizer = build_optimizer(cfg, total_steps=10)
    assert isinstance(optimizer, optim.AdamW) and optimizer.bias_correction
    w = np.array([0.5, -1.0, 2.0], np.float32)
    params = {"w": mx.array(w)}
    m = v = np.zeros(3)
    for t, g in enumerate([[0.1, -0.2, 0.3], [0.05, 0.1, -0.3], [1.0, 0.0, 0.2]], start=1):
        g = np.array(g)
        params = optimizer.apply_gradients({"w": mx.array(g, mx.float32)}, params)
        # PyTorch's AdamW: decoupled decay, then the bias-corrected Adam step.
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        w = w * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)
        np.testing.assert_allclose(np.array(params["w"]), w, rtol=1e-5, atol=1e-6)
    # MLX's own default differs (that is why ours is explicit).
    assert not optim.AdamW(learning_rate=lr).bias_correction


@pytest.mark.parametrize("schedule, expected", [
    # total 11 steps, warmup 4: steps 1-4 ramp from 0, step 5 is the peak,
    # step 11 reaches min_learning_rate.
    ("cosine", {1: 0.0, 3: 0.5, 5: 1.0, 8: 0.55, 11: 0.1}),
    ("linear", {1: 0.0, 2: 0.25, 5: 1.0, 8: 0.55, 11: 0.1}),
    ("constant", {1: 0.0, 4: 0.75, 5: 1.0, 11: 1.0}),
])
def test_schedule_values(schedule, expected):
    cfg = TrainingConfig(learning_rate=1.0, min_learning_rate=0.1, warmup_steps=4,
                         lr_schedule=schedule)
    for step, value in expected.items():
        assert learning_rate_at(cfg, 11, step) == pytest.approx(value, abs=1e-6), step


def test_schedule_counts_optimizer_steps_with_accumulation():
    callbacks, steps, _, _ = recorder()
    cfg = config(max_steps=5, gradient_accumulation_steps=3, warmup_steps=2,
                 lr_schedule="linear", learning_rate=0.01, min_learning_rate=0.001)
    result = Trainer(build_model(), cfg, cycle_batch, batches_per_epoch=6,
                     callbacks=callbacks).run()
    lrs = [s.learning_rate for s in steps]
    np.testing.assert_allclose(lrs, [0.0, 0.005, 0.01, 0.0055, 0.001], rtol=1e-5, atol=1e-9)
    assert result.micro_batch_index == 15
    assert steps[-1].epoch == pytest.approx(15 / 6)


def test_clipping_caps_the_applied_update():
    callbacks, steps, _, _ = recorder()
    model = build_model()
    start = trainable(model)
    cfg = config(max_steps=1, optimizer="sgd", learning_rate=1.0, max_grad_norm=0.01)
    Trainer(model, cfg, cycle_batch, batches_per_epoch=1, callbacks=callbacks).run()
    after = trainable(model)
    update_norm = math.sqrt(sum(float(((after[k] - start[k]) ** 2).sum()) for k in after))
    assert steps[0].grad_norm > 0.1  # reported before clipping
    assert update_norm == pytest.approx(0.01, rel=1e-3)


# ---- non-finite guard ---------------------------------------------------------

def poisoned(bad: set[int]):
    def batch_at(index):
        batch = cycle_batch(index)
        if index in bad:
            batch.loss_mask[0, 3] = np.nan
        return batch
    return batch_at


def test_non_finite_loss_fails_the_run_by_default():
    model = build_model()
    with pytest.raises(NonFiniteLoss) as info:
        Trainer(model, config(max_steps=5), poisoned({2}), batches_per_epoch=10).run()
    assert info.value.reason == "NON_FINITE_LOSS"
    assert info.value.metadata["step"] == "3"
    assert all(np.isfinite(v).all() for v in trainable(model).values())


def test_skip_step_policy_skips_counts_and_then_fails():
    callbacks, steps, _, _ = recorder()
    model = build_model()
    cfg = config(max_steps=5, non_finite_policy="NON_FINITE_POLICY_SKIP_STEP",
                 max_skipped_steps=2)
    result = Trainer(model, cfg, poisoned({2}), batches_per_epoch=10,
                     callbacks=callbacks).run()
    assert result.step == 5 and result.skipped_steps == 1
    assert result.micro_batch_index == 6  # the skipped step's data was consumed
    assert [(s.step, s.skipped) for s in steps] == [
        (1, False), (2, False), (3, True), (3, False), (4, False), (5, False)]
    assert all(np.isfinite(v).all() for v in trainable(model).values())

    with pytest.raises(NonFiniteLoss) as info:
        Trainer(build_model(), cfg, poisoned({1, 2, 3}), batches_per_epoch=10).run()
    assert info.value.metadata["skipped_steps"] == "3"


def test_should_stop_ends_the_run_between_steps():
    callbacks, steps, _, saves = recorder()
    callbacks.should_stop = lambda: len(steps) >= 2
    result = Trainer(build_model(), config(max_steps=5), cycle_batch, batches_per_epoch=10,
                     callbacks=callbacks).run()
    assert result.stopped and result.step == 2 and saves == []


# ---- exact resume ---------------------------------------------------------------

def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    cfg = config(max_steps=12, save_every_steps=6, compile=True, warmup_steps=2,
                 gradient_accumulation_steps=2)
    callbacks, straight, _, _ = recorder()
    Trainer(build_model(dropout=0.2), cfg, cycle_batch, batches_per_epoch=10,
            callbacks=callbacks).run()

    # First half, stopped right after the checkpoint at step 6.
    callbacks, first, _, _ = recorder()
    adapter = {}

    def on_checkpoint(step, weights, state):
        adapter.update(weights)
        save_training_state(tmp_path / "state", state)

    callbacks.on_checkpoint = on_checkpoint
    callbacks.should_stop = lambda: len(first) >= 6
    Trainer(build_model(dropout=0.2), cfg, cycle_batch, batches_per_epoch=10,
            callbacks=callbacks).run()
    mx.save_safetensors(str(tmp_path / "adapter.safetensors"), adapter)

    # Second half from disk into fresh objects, with the RNGs disturbed.
    mx.random.seed(12345)
    np.random.seed(54321)
    model = build_model(dropout=0.2, lora_seed=99)
    restore_trainable_weights(model, mx.load(str(tmp_path / "adapter.safetensors")))
    state = load_training_state(tmp_path / "state")
    assert (state.step, state.micro_batch_index) == (6, 12)
    callbacks, second, _, _ = recorder()
    Trainer(model, cfg, cycle_batch, batches_per_epoch=10, callbacks=callbacks,
            resume=state).run()

    assert [s.step for s in second] == list(range(7, 13))
    resumed = [s.loss for s in first + second]
    np.testing.assert_allclose(resumed, [s.loss for s in straight], rtol=1e-5)
    assert len({round(s.loss, 6) for s in straight}) > 6  # losses really changed


def test_resume_refuses_a_different_config(tmp_path):
    callbacks, _, _, _ = recorder()
    callbacks.on_checkpoint = lambda step, w, state: save_training_state(tmp_path, state)
    Trainer(build_model(), config(max_steps=2), cycle_batch, batches_per_epoch=10,
            callbacks=callbacks).run()
    with pytest.raises(FailedPrecondition, match="different run"):
        Trainer(build_model(), config(max_steps=3), cycle_batch, batches_per_epoch=10,
                resume=load_training_state(tmp_path))


def test_state_files_are_replaced_not_accumulated(tmp_path):
    callbacks, _, _, _ = recorder()
    callbacks.on_checkpoint = lambda step, w, state: save_training_state(tmp_path, state)
    Trainer(build_model(), config(max_steps=3, save_every_steps=1), cycle_batch,
            batches_per_epoch=10, callbacks=callbacks).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "optimizer-00000003.safetensors", "training_state.json"]
    assert load_training_state(tmp_path).step == 3


# ---- gradient checkpointing -------------------------------------------------------

def test_gradient_checkpointing_changes_memory_not_results():
    runs = []
    for checkpointing in (False, True):
        callbacks, steps, _, _ = recorder()
        model = build_model()
        Trainer(model, config(max_steps=3, gradient_checkpointing=checkpointing),
                cycle_batch, batches_per_epoch=10, callbacks=callbacks).run()
        runs.append([s.loss for s in steps])
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)
    # Only that model's blocks changed: a new model of the type is untouched.
    assert type(build_model().layers[0]).__name__ == "TransformerBlock"


def directional_derivative_gap(model, batch, seed=5) -> tuple[float, float]:
    """(gradient . v, central difference along v) of the summed loss, in
    float64, with the same dropout masks (same seed) in every evaluation."""
    model.set_dtype(mx.float64)
    inputs, targets, weights = MaskedLoss(head=None).prepare(batch)

    def loss(model):
        ce = nn.losses.cross_entropy(model(inputs), targets) * weights.astype(mx.float64)
        return ce.sum()

    def at(seed_):
        mx.random.seed(seed_)
        return loss(model).item()

    mx.random.seed(seed)
    grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    params = dict(tree_flatten(model.trainable_parameters()))
    mx.random.seed(0)
    direction = {k: mx.random.normal(p.shape).astype(mx.float64) for k, p in params.items()}
    analytic = sum((grads[k] * direction[k]).sum().item() for k in params)
    eps = 1e-6
    model.update(tree_unflatten([(k, params[k] + eps * direction[k]) for k in params]))
    plus = at(seed)
    model.update(tree_unflatten([(k, params[k] - eps * direction[k]) for k in params]))
    minus = at(seed)
    return analytic, (plus - minus) / (2 * eps)


def test_gradient_checkpointing_keeps_dropout_masks_in_the_recomputation(monkeypatch):
    def model_with_dropout():
        model = build_model(dropout=0.3)
        model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05) for k, v in
                                     tree_flatten(model.trainable_parameters())]))
        enable_gradient_checkpointing(model)
        model.train()
        return model

    analytic, numeric = directional_derivative_gap(model_with_dropout(), cycle_batch(0))
    assert analytic == pytest.approx(numeric, rel=1e-3)
    # Without the keyed masks the backward pass redraws dropout: wrong gradients.
    import mlxtune.training.checkpointing as checkpointing
    monkeypatch.setattr(checkpointing, "_active_dropouts", lambda block: [])
    analytic, numeric = directional_derivative_gap(model_with_dropout(), cycle_batch(0))
    assert analytic != pytest.approx(numeric, rel=0.1)


# ---- selective logits ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])  # own head, tied head
def test_selective_logits_loss_equals_full_logits(family):
    model = build_model(family)
    batch = random_batch(7, batch_size=3, length=20)
    selective = MaskedLoss.for_model(model, chunk_size=8)
    assert selective.head == ("lm_head" if family == "llama" else "tied")
    full = MaskedLoss(head=None)
    # Non-zero LoRA B so every adapter weight gets a gradient.
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05) for k, v in
                                 tree_flatten(model.trainable_parameters())]))
    (s_loss, s_n), s_grads = nn.value_and_grad(model, selective)(model, *selective.prepare(batch))
    (f_loss, f_n), f_grads = nn.value_and_grad(model, full)(model, *full.prepare(batch))
    assert float(s_n) == float(f_n) == batch.num_supervised
    assert float(s_loss) == pytest.approx(float(f_loss), rel=1e-5)
    for (name, g), (_, h) in zip(tree_flatten(s_grads), tree_flatten(f_grads), strict=True):
        np.testing.assert_allclose(np.array(g), np.array(h), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_full_logits_for_heads_that_transform_logits():
    gemma2 = {"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 2,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "rms_norm_eps": 1e-6, "vocab_size": VOCAB,
              "query_pre_attn_scalar": 16, "sliding_window": 64}
    model_class, args_class = _get_classes(gemma2)
    assert find_output_head(model_class(args_class.from_dict(gemma2))) is None  # soft-capping

    class ScaledLogits(type(build_model())):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return super().__call__(inputs, cache, input_embeddings) * 2.0

    cfg = tiny_config("llama", vocab_size=VOCAB)
    scaled = ScaledLogits(_get_classes(cfg)[1].from_dict(cfg))
    assert find_output_head(scaled) is None  # caught by the numerical check


def test_bucket_sizes_pad_little_and_stay_few():
    assert [bucket_size(n) for n in (0, 1, 64, 65, 500, 1000, 1025)] == \
        [64, 64, 64, 128, 512, 1024, 1152]
    sizes = {bucket_size(n) for n in range(1, 4097)}
    assert len(sizes) < 40
    assert all(n <= bucket_size(n) < n + max(64, n / 8) for n in range(1, 4097))


# ---- config -------------------------------------------------------------------

def test_config_validation_reports_every_bad_field():
    bad = TrainingConfig(max_steps=10, epochs=2.0, learning_rate=float("nan"), batch_size=0,
                         warmup_steps=10, validation_split=0.7, max_seq_length=1, beta1=1.0,
                         beta2=-0.1, max_grad_norm=-1.0, eval_batches=0)
    with pytest.raises(InvalidArgument) as info:
        bad.validate()
    fields = {v.field for v in info.value.violations}
    assert fields == {"config.epochs", "config.learning_rate", "config.batch_size",
                      "config.warmup_steps", "config.validation_split",
                      "config.max_seq_length", "config.beta1", "config.beta2",
                      "config.max_grad_norm", "config.eval_batches"}
    with pytest.raises(InvalidArgument) as info:
        TrainingConfig(learning_rate=0.0, epochs=1.0, warmup_steps=3, batch_size=8).validate(
            num_train_examples=20)
    assert {v.field for v in info.value.violations} == {
        "config.learning_rate", "config.warmup_steps"}  # 20 examples / 8 -> 3 steps
    TrainingConfig().validate(num_train_examples=100)


def test_config_defaults_and_total_steps():
    cfg = TrainingConfig(optimizer="OPTIMIZER_LION").with_defaults(device="cpu")
    assert cfg.beta2 == 0.99 and cfg.epochs == 1.0 and cfg.bias_correction is True
    assert cfg.compute_dtype.value == "float32"
    assert TrainingConfig().with_defaults(device="gpu").compute_dtype.value == "bfloat16"
    assert TrainingConfig(epochs=2.5, gradient_accumulation_steps=4).total_steps(10) == 7
    assert TrainingConfig(max_steps=3, gradient_accumulation_steps=4).total_steps(10) == 3
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg


def test_config_mirrors_every_proto_field():
    from dataclasses import fields

    from mlxtune.trainer.v1 import trainer_service_pb2 as pb

    proto_fields = {f.name for f in pb.TrainingConfig.DESCRIPTOR.fields}
    assert proto_fields == {f.name for f in fields(TrainingConfig)}


def test_gradient_checkpointing_wraps_only_the_given_model():
    model = build_model()
    assert enable_gradient_checkpointing(model) == 2
    assert type(model.layers[0]).__name__ == "CheckpointedTransformerBlock"
    assert dict(tree_flatten(model.trainable_parameters())).keys() == \
        dict(tree_flatten(build_model().trainable_parameters())).keys()
