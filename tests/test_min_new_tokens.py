"""min_new_tokens: <EOS> may not end a caption before that many tokens, in both families' samplers."""

import pytest
import torch

from tests.test_generate import tiny
from transfusion.config import get_preset
from transfusion.generation import SamplingConfig, caption
from transfusion.packing import SpecialTokens

SP = SpecialTokens()


def eos_first(model):
    """Make <EOS> the greedy choice everywhere, as a model that ends captions at once would."""
    plain = model.lm_logits

    def lm_logits(h):
        logits = plain(h).clone()
        logits[..., SP.eos] += 50.0
        return logits

    model.lm_logits = lm_logits
    return model


def test_bad_min_new_tokens_is_refused_naming_it():
    for bad in (-1, 65, 1.5, True):
        with pytest.raises(ValueError, match="min_new_tokens"):
            SamplingConfig(min_new_tokens=bad)
    assert SamplingConfig(min_new_tokens=64).min_new_tokens == 64


@pytest.mark.parametrize("minimum", [0, 1, 3])
def test_transfusion_captions_have_at_least_min_new_tokens(minimum):
    model = eos_first(tiny(seed=2))
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    caps = caption(model, latents, generator=0, max_new_tokens=6, min_new_tokens=minimum, num_steps=2)
    assert all(len(c) == minimum for c in caps), caps  # then <EOS>, which is not returned
    assert all(SP.eos not in c for c in caps)


@pytest.mark.parametrize("minimum", [0, 1, 3])
def test_discrete_captions_have_at_least_min_new_tokens(minimum):
    from transfusion.baseline import DiscreteLM
    from transfusion.baseline_sampling import caption_images

    torch.manual_seed(0)
    model = eos_first(
        DiscreteLM(get_preset("tiny", dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=64), 16)
    )
    codes = torch.randint(0, 16, (3, 2, 2), generator=torch.Generator().manual_seed(1))
    out = caption_images(model, codes, special=SP, max_new_tokens=6, min_new_tokens=minimum)
    assert [len(t) for t in out.tokens] == [minimum] * 3 and all(out.finished)
    via_api = caption(model, codes, generator=0, max_new_tokens=6, min_new_tokens=minimum)
    assert via_api == out.tokens
    with pytest.raises(ValueError, match="min_new_tokens"):
        caption_images(model, codes, special=SP, max_new_tokens=2, min_new_tokens=3)
