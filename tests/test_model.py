"""Structure of the hierarchy: context-free encoder, causal main model and decoder, flat baseline."""

import pytest
import torch
from _tiny import random_bytes, tiny_model

from haed.layers import apply_rotary, rotary
from haed.model import unique_patches


def test_encoder_is_context_free():
    model = tiny_model(patch_size=4)
    patches = random_bytes(1, 6, 4)
    before = model.encoder(patches)
    changed = patches.clone()
    changed[0, [0, 3, 5]] = random_bytes(3, 4, seed=1)
    after = model.encoder(changed)
    for j in (1, 2, 4):
        torch.testing.assert_close(after[0, j], before[0, j], rtol=0, atol=0)
    assert not torch.allclose(after[0, 3], before[0, 3])
    # The same patch gives the same vector wherever it stands, alone or in a batch.
    torch.testing.assert_close(model.encoder(patches[0, 2:3]), before[0, 2:3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("conditioning", ["add", "prefix"])
def test_byte_logits_are_causal(conditioning):
    """Perturbing byte i changes no logit at positions <= i (position i predicts byte i)."""
    model = tiny_model(patch_size=4, conditioning=conditioning)
    x = random_bytes(1, 32)
    with torch.no_grad():
        base = model(x)
        for i in (0, 5, 7, 8, 13, 31):
            y = x.clone()
            y[0, i] = (int(y[0, i]) + 1) % 256
            out = model(y)
            torch.testing.assert_close(out[0, : i + 1], base[0, : i + 1], rtol=0, atol=1e-6)
            if i < 31:
                assert not torch.allclose(out[0, i + 1 :], base[0, i + 1 :])


def test_main_model_is_causal_at_patch_level():
    model = tiny_model(patch_size=4)
    x = random_bytes(2, 32)
    with torch.no_grad():
        h = model.hidden(x)
        y = x.clone()
        y[:, 20:24] = random_bytes(2, 4, seed=3)  # patch 5
        h2 = model.hidden(y)
    torch.testing.assert_close(h2[:, :6], h[:, :6], rtol=0, atol=1e-6)  # h_t sees patches < t only
    assert not torch.allclose(h2[:, 6], h[:, 6])


def test_hidden_with_and_without_deduplication_agree():
    model = tiny_model(patch_size=4)
    x = random_bytes(2, 32)
    x[:, 8:16] = x[:, 0:8]
    with torch.no_grad():
        every_patch = model.encoder(x.view(-1, 4)).view(2, 8, -1)  # each patch encoded on its own
        torch.testing.assert_close(model.hidden(x), model.hidden_from_vectors(every_patch), rtol=1e-6, atol=1e-6)


def test_flat_model_is_causal():
    model = tiny_model(arch="flat")
    x = random_bytes(1, 24)
    with torch.no_grad():
        base = model(x)
        y = x.clone()
        y[0, 10] ^= 1
        out = model(y)
    torch.testing.assert_close(out[0, :11], base[0, :11], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0, 11:], base[0, 11:])


@pytest.mark.parametrize("k", [2, 4, 8, 12])
def test_unique_patches_round_trip(k):
    patches = random_bytes(50, k) % 3  # few distinct values: many duplicates
    uniq, inverse, counts = unique_patches(patches)
    assert torch.equal(uniq[inverse], patches)
    assert len(set(map(tuple, patches.tolist()))) == uniq.shape[0]
    assert int(counts.sum()) == 50


def test_attention_over_a_batch_too_large_for_one_kernel_call_is_split_exactly(monkeypatch):
    import haed.layers as model_module

    model = tiny_model(patch_size=4)
    patches = random_bytes(10, 4)
    whole = model.encoder(patches)
    monkeypatch.setattr(model_module, "SHORT_SEQUENCE", 0)  # through the fused kernels, as for longer patches
    monkeypatch.setattr(model_module, "MAX_ATTENTION_BATCH", 3)
    batches = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        batches.append(q.shape[0])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    torch.testing.assert_close(model.encoder(patches), whole, rtol=0, atol=1e-6)
    assert batches == [3, 3, 3, 1]  # one encoder layer, 10 patches in pieces of at most 3


@pytest.mark.parametrize("causal", [True, False])
def test_short_attention_equals_fused_attention(causal):
    """The plain-product attention used for a patch's few positions is the same function as SDPA."""
    from haed.layers import short_attention

    q, k, v = (torch.randn(5, 3, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(short_attention(q, k, v, causal), reference, rtol=1e-5, atol=1e-6)


def test_short_attention_with_a_key_mask_equals_fused_attention():
    """The compiled generation step attends a cached query over the slots a mask makes visible with plain
    products; that is SDPA's masked attention (masked keys get no weight, garbage in them changes nothing)."""
    from haed.layers import short_attention

    q = torch.randn(3, 4, 1, 16, generator=torch.Generator().manual_seed(0))
    k, v = (torch.randn(3, 4, 9, 16, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    visible = (torch.arange(9) <= 5).view(1, 9)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    got = short_attention(q, k, v, causal=False, visible=visible)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    k[..., 6:, :], v[..., 6:, :] = 1e4, -1e4  # what the hidden slots hold does not matter
    torch.testing.assert_close(short_attention(q, k, v, causal=False, visible=visible), got, rtol=0, atol=0)


def test_stack_blocks_in_parts_equal_the_whole_stack():
    """The decoder phase's split of the main model (lower blocks, then the top ones and the norm) computes
    the main model's own h_t."""
    model = tiny_model(patch_size=4)
    x = random_bytes(2, 32, seed=5)
    layers = len(model.main.blocks)
    with torch.no_grad():
        inputs = model.main_inputs_of(x)
        whole = model.hidden(x)
        for cut in range(layers + 1):
            below = model.main(inputs, blocks=(0, cut), norm=False)
            torch.testing.assert_close(model.main(below, blocks=(cut, layers)), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_the_rotation_of_the_two_halves_bit_for_bit(dtype):
    """`apply_rotary` (x cos + (x2, x1) sin with the sign in the table) gives exactly the textbook rotation
    (x1 cos - x2 sin, x2 cos + x1 sin) of each pair (i, i + head_dim / 2), in float32, as trained models
    were trained with."""
    head_dim, length = 16, 40
    x = torch.randn(2, length, 3, head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    cos, sin = rotary(torch.arange(length), head_dim, 10000.0)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(length).float()[:, None] * inv_freq[None, :]
    c, s = angles.cos().view(length, 1, -1), angles.sin().view(length, 1, -1)
    x1, x2 = x.float().chunk(2, dim=-1)
    expected = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(dtype)
    got = apply_rotary(x, cos.view(length, 1, -1), sin.view(length, 1, -1))
    assert got.dtype == dtype and torch.equal(got, expected)
