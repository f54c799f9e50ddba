"""Size table: the paper's 33 sizes and parameter counts against Table 13, tiny sizes, and config integration."""
import pytest
import torch

from megadistill.config import ConfigError, ModelConfig
from megadistill.model import sizes
from megadistill.model.sizes import (PAPER_SIZES, SIZES, TINY_SIZES, get_size, non_embedding_params, params_of,
                                     stored_params, total_params)

# PAPER.md / Table 13: name -> (n_layers, d_model, d_ff, N in B, N_total in B); 103M has no printed counts.
TABLE_13 = {
    "103M": (8, 1024, 2816, None, None),
    "143M": (9, 1152, 3072, 0.1434, 0.1811),
    "198M": (10, 1280, 3456, 0.1983, 0.2402),
    "266M": (11, 1408, 3840, 0.2657, 0.3118),
    "340M": (12, 1536, 4096, 0.3398, 0.3901),
    "546M": (14, 1792, 4864, 0.546, 0.6047),
    "975M": (17, 2176, 5888, 0.9755, 1.047),
    "1.82B": (21, 2688, 7168, 1.821, 1.909),
    "2.72B": (24, 3072, 8192, 2.718, 2.819),
    "4.82B": (29, 3712, 9984, 4.823, 4.944),
    "7.75B": (34, 4352, 11648, 7.747, 7.889),
    "12.6B": (40, 5120, 13696, 12.61, 12.78),
}


def _args(shape):
    return (shape["n_layers"], shape["d_model"], shape["d_ff"], shape["n_heads"], shape["head_dim"],
            shape["vocab_size"])


@pytest.mark.parametrize("name", sorted(TABLE_13))
def test_printed_rows_match_table_13(name):
    n_layers, d_model, d_ff, n_b, total_b = TABLE_13[name]
    shape = get_size(name)
    assert (shape["n_layers"], shape["d_model"], shape["d_ff"]) == (n_layers, d_model, d_ff)
    assert (shape["head_dim"], shape["n_heads"], shape["vocab_size"]) == (128, n_layers, 32768)
    if n_b is not None:
        assert non_embedding_params(*_args(shape)) / 1e9 == pytest.approx(n_b, rel=5e-3)
        assert total_params(*_args(shape)) / 1e9 == pytest.approx(total_b, rel=5e-3)


def test_family_has_33_sizes_with_fixed_aspect_ratio_and_ffn_rule():
    assert len(PAPER_SIZES) == 33 and len(set(PAPER_SIZES)) == 33
    layers = [SIZES[k]["n_layers"] for k in PAPER_SIZES]
    assert layers == list(range(8, 41))
    ns = [non_embedding_params(*_args(SIZES[k])) for k in PAPER_SIZES]
    assert ns == sorted(ns)
    for k in PAPER_SIZES:
        s = SIZES[k]
        assert s["d_model"] == 128 * s["n_layers"] and s["n_heads"] * s["head_dim"] == s["d_model"]
        assert s["d_ff"] % 128 == 0 and 0 <= s["d_ff"] - 8 * s["d_model"] / 3 < 128
        # the name is N to three significant figures
        assert k == sizes.size_name(non_embedding_params(*_args(s)))
    assert "1.15B" in SIZES and SIZES["1.15B"]["n_layers"] == 18


def test_exact_counts_of_one_size_by_hand():
    # 143M: 9 x (4 d^2 + 3 d d_ff + 2 d + 2 hd) + d, d = 1152, d_ff = 3072, hd = 128
    d, f = 1152, 3072
    n = 9 * (4 * d * d + 3 * d * f + 2 * d + 2 * 128) + d
    assert non_embedding_params(9, d, f, 9, 128) == n == 143_351_424
    assert total_params(9, d, f, 9, 128) == n + 32768 * d
    assert stored_params(9, d, f, 9, 128) == n + 2 * 32768 * d
    assert non_embedding_params(9, d, f, 9, 128, qk_norm=False) == n - 9 * 256


def test_unknown_size_lists_known_names():
    with pytest.raises(KeyError, match=r"unknown size 'nope'; known: 103M, 143M"):
        get_size("nope")
    with pytest.raises(ConfigError, match="model.size='nope'"):
        ModelConfig(size="nope").resolve()


def test_get_size_returns_a_copy():
    get_size("tiny-1M")["d_model"] = 1
    assert get_size("tiny-1M")["d_model"] == 128


@pytest.mark.parametrize("name", TINY_SIZES)
def test_tiny_sizes_are_named_by_their_n_and_split_over_tp4(name):
    s = get_size(name)
    approx = float(name[len("tiny-"):-1]) * 1e6
    n = non_embedding_params(*_args(s))
    assert 0.8 < n / approx < 1.25
    assert 16 <= s["head_dim"] <= 64 and s["n_heads"] * s["head_dim"] == s["d_model"]
    assert s["vocab_size"] in (512, 1024)
    for dim in ("n_heads", "d_ff", "vocab_size"):
        assert s[dim] % 4 == 0


def test_params_of_a_resolved_config_and_the_built_model():
    from megadistill.model.transformer import Transformer
    cfg = ModelConfig(size="tiny-0.5M").resolve()
    cfg.validate()
    n, n_total = params_of(cfg)
    assert (n, n_total) == (non_embedding_params(*_args(get_size("tiny-0.5M"))),
                            total_params(*_args(get_size("tiny-0.5M"))))
    model = Transformer(cfg)
    stored = sum(p.numel() for p in model.parameters())
    assert stored == stored_params(*_args(get_size("tiny-0.5M")))
    embeds = model.embed.weight.numel() + model.head.weight.numel()
    assert stored - embeds == n
    cfg_big = ModelConfig(size="546M").resolve()
    assert (cfg_big.n_layers, cfg_big.d_model, cfg_big.d_ff, cfg_big.n_heads) == (14, 1792, 4864, 14)
    assert torch.is_tensor(model.output_weight)
