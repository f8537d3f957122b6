"""The nested-attention image adapter: resampler maths, IP-Adapter-Plus layout, layer order, errors."""
from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from concept_attention.attention.layers import CrossAttentionLayer
from concept_attention.sampling.nested_adapter import (AdapterConfig, NestedAdapter, PerceiverAttention,
                                                       adapter_from_state_dict, config_for_layers,
                                                       ip_order, load_adapter, save_adapter)
from support.tiny_adapters import plus_state_dict

# SD1.5's cross-attention layers as ComfyUI names them (block, id, depth) with their widths
SD15_LAYERS = ([("input", i, 320) for i in (1, 2)] + [("input", i, 640) for i in (4, 5)]
               + [("input", i, 1280) for i in (7, 8)] + [("middle", 0, 1280)]
               + [("output", i, 1280) for i in (3, 4, 5)] + [("output", i, 640) for i in (6, 7, 8)]
               + [("output", i, 320) for i in (9, 10, 11)])
SD15_IP_WIDTHS = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]


def sd15_layers() -> list[CrossAttentionLayer]:
    return [CrossAttentionLayer((block, i, 0), 1, 8, width // 8, f"{block}.{i}") for block, i, width in SD15_LAYERS]


def tiny_config(**over) -> AdapterConfig:
    base = dict(embed_dim=12, dim=16, depth=2, heads=2, dim_head=8, num_queries=4, out_dim=10,
                widths=(8, 8, 16))
    return AdapterConfig(**{**base, **over})


def test_shapes():
    torch.manual_seed(0)
    adapter = NestedAdapter(tiny_config())
    tokens = adapter.tokens(torch.randn(3, 7, 12))
    assert tokens.shape == (3, 4, 10)
    kv = adapter(torch.randn(3, 7, 12))
    assert [tuple(k.shape) for k, _ in kv] == [(3, 4, 8), (3, 4, 8), (3, 4, 16)]
    with pytest.raises(ValueError, match="width 12"):
        adapter.tokens(torch.randn(1, 7, 5))


def test_perceiver_attention_by_hand():
    # one head: queries are the latents only, keys/values are [x, latents]; softmax(q k / sqrt(d))
    torch.manual_seed(1)
    attn = PerceiverAttention(dim=4, heads=1, dim_head=3).double()
    x, latents = torch.randn(1, 2, 4, dtype=torch.double), torch.randn(1, 3, 4, dtype=torch.double)
    ln = lambda t, norm: (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5) * norm.weight + norm.bias  # noqa: E731
    xn, ln_lat = ln(x[0], attn.norm1), ln(latents[0], attn.norm2)
    wq, wkv, wo = attn.to_q.weight, attn.to_kv.weight, attn.to_out.weight
    expected = []
    for i in range(3):
        q = wq @ ln_lat[i]
        both = torch.cat([xn, ln_lat])
        keys, values = both @ wkv[:3].T, both @ wkv[3:].T
        scores = torch.stack([q @ keys[j] / math.sqrt(3) for j in range(5)])
        w = torch.exp(scores) / torch.exp(scores).sum()
        expected.append(wo @ (w[:, None] * values).sum(0))
    torch.testing.assert_close(attn(x, latents)[0], torch.stack(expected))


def test_gradcheck():
    torch.manual_seed(2)
    adapter = NestedAdapter(tiny_config(depth=1, num_queries=2, widths=(4,))).double()
    x = torch.randn(1, 3, 12, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: adapter(t)[0][1], (x,))


def test_ip_order_is_input_output_middle():
    order = ip_order(sd15_layers())
    assert [layer.key[0] for layer in order] == ["input"] * 6 + ["output"] * 9 + ["middle"]
    assert [layer.key[1] for layer in order] == [1, 2, 4, 5, 7, 8, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0]
    assert [layer.heads * layer.dim_head for layer in order] == SD15_IP_WIDTHS


def test_sd15_plus_file_loads_and_runs(tmp_path):
    # IP-Adapter-Plus SD1.5 sizes (dim 768, 12 heads of 64, 16 queries, ViT-H 1280 tokens, 16 layers);
    # depth 1 instead of 4 to stay small
    sd = plus_state_dict(768, 1, 768, 16, 1280, 768, SD15_IP_WIDTHS)
    path = tmp_path / "ip-adapter-plus_sd15.safetensors"
    safetensors.torch.save_file(sd, str(path))
    adapter = load_adapter(path)
    c = adapter.config
    assert (c.dim, c.depth, c.heads, c.dim_head, c.num_queries, c.embed_dim, c.out_dim, c.ff_mult) == \
           (768, 1, 12, 64, 16, 1280, 768, 4)
    tokens = adapter.tokens(torch.randn(1, 257, 1280))
    assert tokens.shape == (1, 16, 768) and torch.isfinite(tokens).all()
    layers = sd15_layers()
    kv = adapter.layer_kv(layers, tokens)
    assert set(kv) == {layer.key for layer in layers}
    # the 7th layer in IP-Adapter order (output block 3) uses ip_adapter.13
    k, v = kv[("output", 3, 0)]
    torch.testing.assert_close(k, tokens[0] @ sd["ip_adapter.13.to_k_ip.weight"].float().T)
    torch.testing.assert_close(v, tokens[0] @ sd["ip_adapter.13.to_v_ip.weight"].float().T)
    assert kv[("middle", 0, 0)][0].shape == (16, 1280) and kv[("input", 1, 0)][0].shape == (16, 320)


def test_save_load_round_trip_keeps_head_width(tmp_path):
    torch.manual_seed(3)
    adapter = NestedAdapter(tiny_config(heads=4, dim_head=4))  # not the IP-Adapter default of 64
    path = tmp_path / "mine.safetensors"
    save_adapter(adapter, path)
    loaded = load_adapter(path)
    assert loaded.config == adapter.config
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(loaded.tokens(x), adapter.tokens(x))
    assert not list(tmp_path.glob(".*tmp"))


def test_bad_files_say_what_is_wrong(tmp_path):
    plain = {"image_proj.proj.weight": torch.zeros(3072, 1024), "image_proj.norm.weight": torch.zeros(768),
             "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768)}
    with pytest.raises(ValueError, match="plain IP-Adapter file"):
        adapter_from_state_dict(plain)
    with pytest.raises(ValueError, match="not an IP-Adapter-Plus"):
        adapter_from_state_dict({"image_proj.perceiver_resampler.latents": torch.zeros(1, 4, 8)})
    good = plus_state_dict(16, 1, 64, 4, 12, 10, [8, 8], dtype=torch.float32)
    with pytest.raises(ValueError, match="numbered 1, 3, 5"):
        adapter_from_state_dict({k.replace("ip_adapter.3.", "ip_adapter.4."): v for k, v in good.items()})
    with pytest.raises(ValueError, match="IP-Adapter-Plus layout"):
        adapter_from_state_dict({**good, "image_proj.pos_emb.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="IP-Adapter-Plus layout"):
        adapter_from_state_dict({k: v for k, v in good.items() if k != "image_proj.norm_out.bias"})
    with pytest.raises(ValueError, match="inconsistent sizes"):
        adapter_from_state_dict({**good, "image_proj.layers.0.1.3.weight": torch.zeros(16, 63)})
    with pytest.raises(ValueError, match="only .safetensors"):
        load_adapter(tmp_path / "ip-adapter-plus_sd15.bin")


def test_layer_mismatch_is_explained():
    adapter = NestedAdapter(tiny_config(widths=(320,) * 2 + (640,) * 2))
    with pytest.raises(ValueError, match=r"for a model with 4 cross-attention layers of widths "
                                         r"\[320 x2, 640 x2\]; this model has 16 of widths \[320 x2, 640 x2, 1280 x5"):
        adapter.layer_kv(sd15_layers(), torch.randn(4, 10))


def test_config_for_layers_matches_the_model():
    config = config_for_layers(sd15_layers(), embed_dim=1280)
    assert list(config.widths) == SD15_IP_WIDTHS
    assert NestedAdapter(config).match(sd15_layers())[6].key == ("output", 3, 0)
