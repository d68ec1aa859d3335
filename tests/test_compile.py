"""torch.compile (inductor, here on the CPU) against eager: a training step of NTP and CoCoMix, and generation."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from model import GPT, GPTConfig


def tiny(objective):
    concepts = dict(n_concepts=64, concept_topk=4, concept_layer=1) if objective == "cocomix" else {}
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16, **concepts))


@pytest.mark.parametrize("objective", ["ntp", "cocomix"])
def test_compiled_training_step_equals_eager(objective):
    counters.clear()
    eager = tiny(objective)
    compiled = copy.deepcopy(eager)
    step_model = torch.compile(compiled)
    torch.manual_seed(1)
    x, y = torch.randint(0, 37, (4, 16)), torch.randint(0, 37, (4, 16))
    labels = torch.randint(0, 64, (4, 16, 3)) if objective == "cocomix" else None
    for model, run in ((eager, eager), (compiled, step_model)):
        optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
        for _ in range(2):
            out = run(x, y, labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.last = out
    torch.testing.assert_close(compiled.last.loss, eager.last.loss, atol=1e-5, rtol=1e-5)
    if objective == "cocomix":
        torch.testing.assert_close(compiled.last.concept_loss, eager.last.concept_loss, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    assert not torch.equal(eager.lm_head.weight, tiny(objective).lm_head.weight)
    # compiled whole: one graph, no break back to Python
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.parametrize("objective", ["ntp", "cocomix"])
def test_compiled_generation_equals_eager(objective):
    counters.clear()
    eager = tiny(objective).eval()
    compiled = copy.deepcopy(eager)
    compiled.compile()
    idx = torch.randint(0, 37, (2, 3), generator=torch.Generator().manual_seed(2))
    assert torch.equal(compiled.generate(idx, 8, temperature=0), eager.generate(idx, 8, temperature=0))
    # the prompt's graph and one for the cached steps (their lengths made dynamic), without breaks
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
