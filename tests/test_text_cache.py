"""The per-string LRU cache every text encoder uses (``ghil.nn.encoders.cached_rows``)."""

from collections import OrderedDict

import torch

from ghil.nn.encoders import HashTextConfig, build_text_encoder, cached_rows


def test_rows_come_back_in_order_new_ones_computed_once_and_the_oldest_evicted():
    calls = []

    def compute(todo):
        calls.append(list(todo))
        return torch.tensor([[float(len(t))] for t in todo])

    cache = OrderedDict()
    out = cached_rows(cache, ["ab", "abc", "ab"], compute, cache_size=2)
    assert out.squeeze(1).tolist() == [2.0, 3.0, 2.0] and calls == [["ab", "abc"]]
    cached_rows(cache, ["abc", "a"], compute, cache_size=2)  # "ab" is now the least recently used: evicted
    assert calls[-1] == ["a"] and list(cache) == ["abc", "a"]
    cached_rows(cache, ["ab"], compute, cache_size=2)
    assert calls[-1] == ["ab"]


def test_a_text_encoder_embeds_each_string_once():
    encoder = build_text_encoder(HashTextConfig(16))
    a = encoder(["open the drawer", "turn on the led"])
    b = encoder(["turn on the led", "open the drawer"])
    assert a.shape == (2, 16) and torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
