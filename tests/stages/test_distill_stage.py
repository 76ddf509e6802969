"""The distill stage on tiny random models: it learns, it resumes bit for bit, QAT stores what
it trained with, and bad input fails before training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compress.stages  # noqa: F401  (registers the stages)
from compress.distill import trainer
from compress.distill.config import DistillConfig
from compress.distill.losses import kd_loss
from compress.distill.parallel import DataParallel
from compress.errors import BadInputError, PreflightError
from compress.prune.config import PruneConfig
from compress.quant.config import QuantizeConfig
from compress.quant.linear import QuantLinear
from compress.registry import StageContext, handler_for
from tests.stages.test_prune_stage import VOCAB, tiny_decoder

WINDOWS = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(3))


def _pruned_pair() -> tuple[nn.Module, nn.Module]:
    """(teacher, student): the student is the teacher with half its FFN channels removed and
    noise on its decoder weights (random tiny models are too flat for pruning alone to show)."""
    teacher = tiny_decoder("llama", 2, num_layers=2)
    student = copy.deepcopy(teacher)
    prune = PruneConfig(criterion="magnitude", ffn={"ratio": 0.5})
    handler_for(prune).apply(student, prune, StageContext(dtype="float32"))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if ".layers." in name and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return teacher, student


def _context(teacher: nn.Module, work_dir=None, dtype="float32") -> StageContext:
    return StageContext(
        dtype=dtype,
        calibration_windows=lambda: WINDOWS,
        teacher=lambda _source: teacher,
        work_dir=work_dir,
    )


def _distill(student, teacher, work_dir=None, **config):
    cfg = DistillConfig(**{"steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, **config})
    handler = handler_for(cfg)
    handler.preflight(student, cfg)
    return handler.apply(student, cfg, _context(teacher, work_dir))


def _kd(student: nn.Module, teacher: nn.Module) -> float:
    with torch.no_grad():
        return float(kd_loss(student(WINDOWS).logits, teacher(WINDOWS).logits, 2.0))


def test_a_few_steps_lower_the_distillation_loss():
    teacher, student = _pruned_pair()
    before = _kd(student, teacher)
    result = _distill(student, teacher, steps=12, alpha=1.0)
    after = _kd(student, teacher)
    assert after < 0.8 * before
    assert result.details["steps"] == 12 and len(result.details["curve"]) == 12
    assert student.dtype == torch.float32 and not student.training


def test_hidden_state_matching_adds_its_term():
    teacher, student = _pruned_pair()
    result = _distill(student, teacher, hidden={"layers": [0, 1], "loss": "cosine"})
    assert all("hidden" in point for point in result.details["curve"])


class Killed(Exception):
    pass


def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path, monkeypatch):
    teacher, reference = _pruned_pair()
    student = copy.deepcopy(reference)
    _distill(reference, teacher, steps=7, checkpoint_every=2)

    real = trainer._Setup.accumulate_gradients

    def dies_at_step_5(self, step):
        if step == 5:
            raise Killed
        return real(self, step)

    monkeypatch.setattr(trainer._Setup, "accumulate_gradients", dies_at_step_5)
    interrupted = copy.deepcopy(student)
    with pytest.raises(Killed):
        _distill(interrupted, teacher, tmp_path, steps=7, checkpoint_every=2)
    assert (tmp_path / trainer.TRAINER).is_file()  # the checkpoint of step 4

    monkeypatch.setattr(trainer._Setup, "accumulate_gradients", real)
    # A fresh process would start from the stage's input model; the checkpoint restores the rest.
    result = _distill(student, teacher, tmp_path, steps=7, checkpoint_every=2)
    assert result.details["resumed_from_step"] == 4
    assert [p["step"] for p in result.details["curve"]] == list(range(1, 8))
    for (name, a), (_, b) in zip(
        reference.state_dict().items(), student.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_qat_trains_against_exactly_what_the_quantize_stage_then_stores():
    teacher, student = _pruned_pair()
    qat = {"bits": 4, "group_size": 16, "symmetric": False, "observer": "minmax"}
    _distill(student, teacher, qat=qat)
    seen_in_training = {}
    from compress.distill.fake_quant import FakeQuantize
    from compress.quant.primitives import QuantSpec

    fake = FakeQuantize(QuantSpec(4, 16, False), torch.float32, None)
    for name, module in student.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            seen_in_training[name] = fake(module.weight.detach())
    quantize = QuantizeConfig(bits=4, group_size=16, symmetric=False)
    handler_for(quantize).apply(student, quantize, StageContext(dtype="float32"))
    for name, weight in seen_in_training.items():
        layer = student.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        assert torch.equal(layer.dequantized_weight(), weight), name


def test_qat_over_moe_experts_is_refused_naming_them():
    """QAT fake-quantizes Linears only: on a MoE model the experts would train unaware."""
    from tests.families import tiny_family_model

    student = tiny_family_model("qwen2_moe", VOCAB)
    config = DistillConfig(steps=1, qat={"bits": 4, "group_size": 32})
    with pytest.raises(PreflightError, match=r"model\.layers\.0\.mlp\.experts") as caught:
        handler_for(config).preflight(student, config)
    assert caught.value.field == "qat"


def test_a_teacher_with_another_vocabulary_is_refused_before_training(monkeypatch):
    teacher, student = _pruned_pair()
    teacher.resize_token_embeddings(VOCAB + 8)
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(PreflightError, match="teacher vocabulary"):
        _distill(student, teacher)


def test_hidden_layers_that_do_not_exist_are_refused():
    teacher, student = _pruned_pair()
    with pytest.raises(PreflightError, match=r"hidden.layers \[5\]: the student has 2"):
        _distill(student, teacher, hidden={"layers": [0, 5]})
    with pytest.raises(PreflightError, match=r"hidden.teacher_layers \[9\]"):
        _distill(student, teacher, hidden={"layers": [0], "teacher_layers": [9]})


def test_synthetic_data_is_sampled_from_the_teacher_seeded_and_cached(tmp_path, monkeypatch):
    from compress.distill import stage

    teacher, student = _pruned_pair()
    synthetic = {"num_sequences": 3, "length": 9, "batch_size": 2}
    result = _distill(student, teacher, tmp_path / "a", steps=2, synthetic=synthetic)
    assert result.details["data"] == "teacher samples"
    assert result.details["sequences"] == [3, 9]
    config = DistillConfig(steps=2, synthetic=synthetic, seed=4)
    first = stage.synthetic_sequences(teacher, config.synthetic, seed=4)
    assert torch.equal(first, stage.synthetic_sequences(teacher, config.synthetic, seed=4))
    assert (first[:, 0] == teacher.config.bos_token_id).all()
    assert not torch.equal(first, stage.synthetic_sequences(teacher, config.synthetic, seed=5))
    context = _context(teacher, tmp_path / "b")
    kept = stage.training_sequences(config, context, teacher)
    monkeypatch.setattr(stage, "synthetic_sequences", lambda *a: pytest.fail("sampled again"))
    assert torch.equal(stage.training_sequences(config, context, teacher), kept)


def test_an_offloaded_teacher_teaches_what_a_resident_one_does():
    teacher, student = _pruned_pair()
    offloaded_student = copy.deepcopy(student)
    _distill(student, teacher)
    _distill(offloaded_student, copy.deepcopy(teacher), teacher_device="offload")
    for (name, a), (_, b) in zip(
        student.state_dict().items(), offloaded_student.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
@pytest.mark.parametrize("setting", ["device", "teacher_device"])
def test_a_cuda_device_without_cuda_is_refused_naming_the_setting(setting):
    _teacher, student = _pruned_pair()
    cfg = DistillConfig(steps=1, **{setting: "cuda:0"})
    with pytest.raises(BadInputError, match=f"^{setting}: 'cuda:0'"):
        handler_for(cfg).preflight(student, cfg)


def test_each_rank_trains_an_equal_disjoint_share_of_every_micro_batch():
    rows = list(range(10, 22))
    shares = [DataParallel(rank, 3, torch.device("cpu")).shard(rows) for rank in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4]
    assert sorted(row for share in shares for row in share) == rows


def test_a_batch_size_that_the_processes_cannot_split_is_refused(monkeypatch):
    _teacher, student = _pruned_pair()
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = DistillConfig(steps=1, batch_size=6)
    with pytest.raises(PreflightError, match="batch_size 6: launched on 4 processes"):
        handler_for(cfg).preflight(student, cfg)
