"""backbone.precision "auto": bf16 where it is fast. On a CPU with AVX512-BF16 but no AMX that is
the inference pass (1.47x fp32) and a head's steps on cached features (1.2-1.8x), not a fine-tuning
step (0.71x): BENCHMARKS.md, the machine."""
import pytest
import torch

from graftnet import features
from graftnet.train.loop import State, predict_logits, train_one_epoch


@pytest.mark.parametrize("flags, inference, training, dense", [
    (["avx2", "fma"], "fp32", "fp32", "fp32"),
    (["avx2", "avx512f", "avx512_bf16"], "bf16", "fp32", "bf16"),
    (["avx2", "avx512_bf16", "amx_bf16"], "bf16", "bf16", "bf16"),
])
def test_auto_precision_by_cpu_and_use(monkeypatch, flags, inference, training, dense):
    monkeypatch.setattr(features, "_cpu_flags", lambda: flags)
    assert features.resolve_precision("auto", "cpu") == inference
    assert features.resolve_precision("auto", "cpu", training=True) == training
    assert features.resolve_precision("auto", "cpu", training=True, dense=True) == dense
    for given in ("fp32", "bf16"):  # an explicit choice is never second-guessed
        assert features.resolve_precision(given, "cpu", training=True) == given


def test_training_steps_and_inference_use_their_own_precision(monkeypatch):
    monkeypatch.setattr(features, "_cpu_flags", lambda: ["avx2", "avx512_bf16"])
    seen = []

    class Spy(torch.nn.Linear):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x)
    model = Spy(4, 2)
    x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    train_one_epoch(model, [(x, y)], 1, torch.optim.SGD(model.parameters(), lr=0.1), State(), precision="auto")
    predict_logits(model, [(x, y)], precision="auto")
    assert seen == [False, True]  # the step in fp32, the inference pass in bf16


@pytest.mark.parametrize("flags, head_steps", [(["avx2"], False), (["avx2", "avx512_bf16"], True)])
def test_head_on_cached_features_trains_in_bf16_where_fast(monkeypatch, image_folder, tmp_path, flags, head_steps):
    """The pipeline's head fit asks for the dense rule: its Linear layers run under bf16 autocast
    on an AVX512-BF16 CPU, and in fp32 where bf16 would be emulated."""
    from graftnet import config
    from graftnet.train.pipeline import train
    from .conftest import tiny_overrides
    monkeypatch.setattr(features, "_cpu_flags", lambda: flags)
    seen = []
    original = torch.nn.Linear.forward

    def spy(self, x):
        if torch.is_grad_enabled():   # the training steps, not the evaluation passes
            seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, x)
    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{"train.epochs": 1})), test=False)
    assert seen and set(seen) == {head_steps}
