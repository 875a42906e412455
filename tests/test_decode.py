"""Decoding: KV-cache logits == full forward; greedy == transformers generate; ragged batches == one at a time."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import cancerllm_jax as cj


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Mistral whose window (5) is shorter than prompt + output."""
    folder = tmp_path_factory.mktemp("tiny_decode")
    torch.manual_seed(1)
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=2, sliding_window=5,
                                     max_position_embeddings=256, initializer_range=0.3, rope_theta=5000.0,
                                     eos_token_id=2, bos_token_id=1)
    model = transformers.MistralForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model, cj.load(str(folder), dtype="float32")


def hf_greedy(model, prompt, n, eos=2):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)
    return out[0, len(prompt):].tolist()


def test_cache_decode_logits_equal_full_forward(tiny):
    import jax.numpy as jnp
    from flax import nnx

    _, lm = tiny
    model = nnx.merge(lm.graphdef, lm.state)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(2, 13)).astype(np.int32)
    full, _ = model(jnp.asarray(ids))
    cache = model.init_cache(2, 16)
    prefill, cache = model(jnp.asarray(ids[:, :6]), cache=cache)
    steps = [prefill]
    for t in range(6, 13):
        pos = jnp.full((2, 1), t, jnp.int32)
        logit, cache = model(jnp.asarray(ids[:, t:t + 1]), pos, cache=cache)
        steps.append(logit)
    got = np.concatenate([np.asarray(s) for s in steps], axis=1)
    assert np.abs(got - np.asarray(full)).max() <= 1e-4


@pytest.mark.parametrize("heads,kv_heads,t", [(6, 2, 1), (4, 4, 3), (8, 1, 2)])
def test_cached_attention_equals_gqa_attention(heads, kv_heads, t):
    """The cache layout (keys [B,KVH,D,S], values [B,KVH,S,D]) gives gqa_attention's result for one or more
    queries, GQA ratios 1/3/8, with masked slots (a fully masked row stays finite)."""
    import jax.numpy as jnp

    from cancerllm_jax.model.mistral import cached_attention, gqa_attention, mask_bias

    rng = np.random.default_rng(heads + t)
    b, s, d = 3, 11, 8
    q = rng.standard_normal((b, t, heads, d)).astype(np.float32)
    k = rng.standard_normal((b, s, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kv_heads, d)).astype(np.float32)
    mask = rng.random((b, t, s)) < 0.7
    mask[0, 0] = False
    want = np.asarray(gqa_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
    got = np.asarray(cached_attention(jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 3, 1)),
                                      jnp.asarray(v.transpose(0, 2, 1, 3)), mask_bias(jnp.asarray(mask))))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
    assert np.abs(got[1:] - np.asarray(gqa_attention(jnp.asarray(q), jnp.asarray(k[:, ::-1]), jnp.asarray(v),
                                                     jnp.asarray(mask)))[1:]).max() > 1e-3  # can fail


def test_cached_attention_keeps_a_half_precision_cache_dtype():
    """A bf16 cache (the GPU decode) gives bf16 outputs close to the fp32 result (both products accumulate in
    fp32; the softmax weights are cast to the cache dtype as the probabilities were)."""
    import jax.numpy as jnp

    from cancerllm_jax.model.mistral import cached_attention, mask_bias

    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 1, 8, 16)).astype(np.float32)
    kt = rng.standard_normal((2, 2, 16, 9)).astype(np.float32)
    v = rng.standard_normal((2, 2, 9, 16)).astype(np.float32)
    bias = mask_bias(jnp.asarray(rng.random((2, 1, 9)) < 0.8))
    want = np.asarray(cached_attention(jnp.asarray(q), jnp.asarray(kt), jnp.asarray(v), bias))
    got = cached_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, kt, v)), bias)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)


def test_greedy_matches_transformers_past_the_window(tiny):
    model, lm = tiny
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 40], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    got = lm.generate(prompts, max_new_tokens=12, temperature=0.0)
    for p, g in zip(prompts, got):
        assert g == hf_greedy(model, p, 12)


def test_long_left_padded_prompts_prefill_in_query_blocks_as_transformers(tiny):
    """Prompts past 128 tokens are prefilled in query blocks (``causal_attention``), the shorter one left-padded in
    the same bucket: greedy tokens equal transformers' for each prompt alone."""
    from cancerllm_jax.model.mistral import causal_block_size

    model, lm = tiny
    rng = np.random.default_rng(8)
    prompts = [[1] + rng.integers(3, 96, size=n).tolist() for n in (150, 137)]
    assert causal_block_size(len(prompts[0])) < len(prompts[0])
    got = lm.generate(prompts, max_new_tokens=10, temperature=0.0)
    for p, g in zip(prompts, got):
        assert g == hf_greedy(model, p, 10)


def test_a_window_of_one_decodes_as_transformers_without_a_cache(tmp_path):
    """At ``sliding_window=1`` each token attends to itself alone. transformers 5.24's cached ``generate`` is the
    wrong reference there (its sliding cache keeps ``[-window + 1:]``, i.e. every key at window 1); its
    cache-free ``generate(use_cache=False)`` is the right one, and ours equals it."""
    torch.manual_seed(3)
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=1,
                                     initializer_range=0.3, eos_token_id=2, bos_token_id=1)
    model = transformers.MistralForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    prompts = [[5], [7, 8, 9, 10]]
    got = cj.load(str(tmp_path)).generate(prompts, max_new_tokens=8, eos_id=[])
    for p, g in zip(prompts, got):
        with torch.no_grad():
            want = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, use_cache=False,
                                  attention_mask=torch.ones(1, len(p), dtype=torch.long), eos_token_id=None,
                                  pad_token_id=0)[0, len(p):].tolist()
        assert g == want


def test_ragged_batch_equals_each_prompt_alone(tiny):
    _, lm = tiny
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 96, size=n).tolist() for n in (3, 17, 9, 1, 30)]
    batched = lm.generate(prompts, max_new_tokens=8)
    alone = [lm.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone


def test_long_prompts_keep_their_bos_and_last_tokens(tiny):
    _, lm = tiny
    rng = np.random.default_rng(5)
    with_bos = [1] + rng.integers(3, 96, size=20).tolist()
    without = rng.integers(3, 96, size=20).tolist()
    got = lm.generate([with_bos, without, [1, 5, 6]], max_new_tokens=6, max_prompt_tokens=4)  # inside the window
    assert lm._decoder.last_stats["truncated_prompts"] == 2
    assert got == lm.generate([[1] + with_bos[-3:], without[-4:], [1, 5, 6]], max_new_tokens=6)


def test_sampling_is_seeded_and_respects_top_k(tiny):
    _, lm = tiny
    prompts = [[1, 5, 6], [1, 7]]
    a = lm.generate(prompts, max_new_tokens=10, temperature=0.8, top_k=5, seed=7)
    b = lm.generate(prompts, max_new_tokens=10, temperature=0.8, top_k=5, seed=7)
    c = lm.generate(prompts, max_new_tokens=10, temperature=0.8, top_k=5, seed=8)
    assert a == b and a != c
    one = lm.generate(prompts, max_new_tokens=10, temperature=1.0, top_k=1, seed=1)
    assert one == lm.generate(prompts, max_new_tokens=10)  # top-1 sampling is greedy


def test_eos_stops_a_row_and_is_returned(tiny):
    model, lm = tiny
    prompt = [1, 5, 6, 7]
    first = lm.generate([prompt], max_new_tokens=1)[0][0]
    got = lm.generate([prompt], max_new_tokens=10, eos_id=first)[0]
    assert got == [first]
    assert got == hf_greedy(model, prompt, 10, eos=first)


def test_bad_prompts_are_clear_errors(tiny):
    _, lm = tiny
    with pytest.raises(cj_errors().UserError, match="prompt 1"):
        lm.generate([[1, 2], []], max_new_tokens=2)
    with pytest.raises(cj_errors().UserError, match="token ids"):
        lm.generate([[1, 500]], max_new_tokens=2)
    for bad in ([1, 5.5], [1, "7"], [True, 5], "15"):  # not silently 5, 7, 1 or [1, 5]
        with pytest.raises(cj_errors().UserError, match="prompt 1: expected a list of token ids"):
            lm.generate([[1, 2], bad], max_new_tokens=2)
    assert lm.generate([np.array([1, 5], np.int64), [1.0, 5.0]], max_new_tokens=2, eos_id=[]) == \
        lm.generate([[1, 5]] * 2, max_new_tokens=2, eos_id=[])
    with pytest.raises(cj_errors().UserError, match="no tokenizer"):
        lm.generate(["hello"], max_new_tokens=2)
    for bad in (b"\x01\x05", bytearray(b"\x01")):  # a bytes' items are ints: the prompt was read as ids, silently
        with pytest.raises(cj_errors().UserError, match="prompt 0: .*decode it to str"):
            lm.generate([bad], max_new_tokens=2)


def test_a_lone_surrogate_in_a_string_prompt_is_a_clear_error(tiny, monkeypatch):
    """The tokenizer raised a bare TypeError for "abc\\ud800" (generate.py's JSONL reader refuses such escapes)."""
    _, lm = tiny
    monkeypatch.setattr(lm, "tokenizer", object())  # refused before the tokenizer is asked
    with pytest.raises(cj_errors().UserError, match=r"prompt 0: a lone UTF-16 surrogate \('\\ud800'\) at character 3"):
        lm.generate(["abc\ud800", "fine"], max_new_tokens=2)


def test_sampling_settings_without_a_temperature_are_named(tiny, caplog):
    """top_k / top_p with temperature 0 decode greedily, as documented; a transformers user (who thinks in
    do_sample) is told, as transformers tells them."""
    _, lm = tiny
    greedy = lm.generate([[1, 2, 3]], max_new_tokens=3)
    with caplog.at_level("WARNING"):
        assert lm.generate([[1, 2, 3]], max_new_tokens=3, top_k=5, top_p=0.5) == greedy
    assert "top_k=5, top_p=0.5 apply only when sampling (temperature > 0): decoding greedily" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # once per decoder: the CLIs call it batch by batch
        lm.generate([[1, 2, 3]], max_new_tokens=3, top_k=5)
    assert "apply only when sampling" not in caplog.text
    with caplog.at_level("WARNING"):
        lm.generate([[1, 2, 3]], max_new_tokens=3, top_k=0, top_p=1.0)
        lm.generate([[1, 2, 3]], max_new_tokens=3, top_k=5, temperature=0.7)
    assert "apply only when sampling" not in caplog.text


def test_bad_decoding_arguments_are_clear_errors(tiny):
    """The API checks what the CLI checks: counts, top_p, stop strings (string prompts only), eos_id arrays."""
    _, lm = tiny
    err = cj_errors().UserError
    for kwargs, needle in [({"batch_size": 0}, "batch_size"), ({"batch_size": -1}, "batch_size"),
                           ({"max_new_tokens": 2.0}, "max_new_tokens"), ({"max_prompt_tokens": -1}, "max_prompt"),
                           ({"top_p": 2.0}, "top_p"), ({"top_p": -0.1}, "top_p"),
                           ({"temperature": float("nan")}, "temperature"), ({"stop": ["x"]}, "string prompts"),
                           ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
                           ({"top_k": 2.5}, "top_k"), ({"top_k": True}, "top_k"), ({"top_k": "3"}, "top_k"),
                           ({"temperature": "hot"}, "temperature"), ({"temperature": [1.0]}, "temperature"),
                           ({"top_p": "0.9"}, "top_p")]:  # not silently k=2 / k=1, nor a bare ValueError
        with pytest.raises(err, match=needle):
            lm.generate([[1, 2]], **{"max_new_tokens": 2, **kwargs})
    base = lm.generate([[1, 2, 3]], max_new_tokens=4, eos_id=[])
    assert lm.generate([[1, 2, 3]], max_new_tokens=4, eos_id=np.array([], np.int64), top_p=None) == base
    assert lm.generate([[1, 2, 3]], max_new_tokens=4, eos_id=np.int64(base[0][1])) == [base[0][:2]]
    for bad in (["</s>"], "2", [[2], "x"], 2.5, [True]):  # not silently id 2 / id 1
        with pytest.raises(err, match="eos_id must be a token id"):
            lm.generate([[1, 2, 3]], max_new_tokens=4, eos_id=bad)
    for bad in (2**40, [2, lm.cfg.vocab_size], 2**63):  # never a stop (nor an OverflowError traceback)
        with pytest.raises(err, match="is not a token id of this model"):
            lm.generate([[1, 2, 3]], max_new_tokens=2, eos_id=bad)
    with pytest.raises(err, match="add_bos must be True or False"):
        lm.generate([[1, 2, 3]], max_new_tokens=2, add_bos="no")
    kw = dict(max_new_tokens=3, temperature=1.0, eos_id=[])  # any int is a seed, taken mod 2**64
    assert lm.generate([[1, 2, 3]], seed=2**64 + 3, **kw) == lm.generate([[1, 2, 3]], seed=3, **kw)
    assert lm.generate([[1, 2, 3]], seed=2**70, **kw) == lm.generate([[1, 2, 3]], seed=0, **kw)
    assert lm.generate([[1, 2, 3]], seed=2**63, **kw) == lm.generate([[1, 2, 3]], seed=-2**63, **kw)
    assert lm.generate([[1, 2, 3]], seed=2**32, **kw) != lm.generate([[1, 2, 3]], seed=0, **kw)  # all 64 bits
    from cancerllm_jax.decode import _row_keys

    assert (_row_keys(7, 2)[1] == np.asarray(jax.random.fold_in(jax.random.PRNGKey(7), 1))).all()  # as before


def test_a_sampled_prompt_does_not_depend_on_its_batch(tiny):
    """Each prompt samples from its own stream: the same output at any batch size, and with one seed per prompt
    also alone or in another order."""
    _, lm = tiny
    prompts = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 7, 8], [1, 2]]
    kw = dict(max_new_tokens=6, temperature=1.0, eos_id=[])
    whole = lm.generate(prompts, batch_size=4, seed=3, **kw)
    assert lm.generate(prompts, batch_size=1, seed=3, **kw) == whole == lm.generate(prompts, batch_size=3, seed=3,
                                                                                     **kw)
    assert lm.generate(prompts, batch_size=4, seed=4, **kw) != whole
    seeds = [11, 12, 13, 14]
    alone = [lm.generate([p], seed=[s], **kw)[0] for p, s in zip(prompts, seeds, strict=True)]
    assert lm.generate(prompts, seed=seeds, **kw) == alone
    assert lm.generate(prompts[::-1], seed=seeds[::-1], batch_size=2, **kw) == alone[::-1]
    with pytest.raises(cj_errors().UserError, match="one int per prompt"):
        lm.generate(prompts, seed=[1, 2], **kw)


def test_a_sample_does_not_depend_on_how_near_ties_sort():
    """The sampling noise belongs to token ids, not to sort positions: logits that differ in the last bits (as
    between batch shapes) reorder near-tied tokens in the sort, and used to hand them each other's noise (a line's
    sample changed with --batch-size). The draws still follow the distribution."""
    from cancerllm_jax.decode import nucleus_drop_mass, sample_logits

    keys = jax.random.split(jax.random.PRNGKey(0), 256)
    tied = jnp.zeros((256, 1000), jnp.float32)  # every token tied: the sort order is arbitrary
    nudged = tied + 1e-6 * jax.random.normal(jax.random.PRNGKey(1), tied.shape)  # reorders the sort completely
    a = sample_logits(tied, keys, 1.0, 0, nucleus_drop_mass(1.0), False)
    b = sample_logits(nudged, keys, 1.0, 0, nucleus_drop_mass(1.0), False)
    assert (np.asarray(a) == np.asarray(b)).all()
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    many = jax.random.split(jax.random.PRNGKey(2), 20000)
    drawn = sample_logits(jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32)), many, 1.0, 0, -1.0, False)
    np.testing.assert_allclose(np.bincount(np.asarray(drawn), minlength=5) / 20000, probs, atol=0.012)


def test_a_stop_string_is_one_string():
    from cancerllm_jax.decode import generated_text

    class Chars:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    ids = [ord(c) for c in "jrnkf nojb"]
    assert generated_text(Chars(), ids, [], ["kf"]) == "jrn" == generated_text(Chars(), ids, [], ["zz", "kf", "f"])
    # the stop string complete first wins, whatever the list's order (not the first listed, nor the first found)
    abcd = [ord(c) for c in "abcd"]
    assert generated_text(Chars(), abcd, [], ["bc", "ab"]) == "" == generated_text(Chars(), abcd, [], ["ab", "bc"])
    assert generated_text(Chars(), abcd, [], ["abcd", "bc"]) == "a" == generated_text(Chars(), abcd, [], ["bc", "abcd"])
    assert generated_text(Chars(), abcd, [], ["bc", "abc"]) == ""  # complete together: the longer one's start


def test_a_stop_string_that_is_a_special_token_stops_there():
    """A chat turn's end (``<|im_end|>``, here Mistral's ``</s>``) given as a stop string while the EOS is another
    id: decoded text drops special tokens, so it was never found and the next turn's text came through."""
    pytest.importorskip("mistral_common")
    from cancerllm_jax.data.tokenizer import load_tokenizer
    from cancerllm_jax.decode import generated_text

    tok = load_tokenizer("mistral-v1")
    ids = tok.encode("The answer is 42.") + [2] + tok.encode("user: more")
    assert generated_text(tok, ids, [], ["</s>"]) == "The answer is 42."
    assert generated_text(tok, ids, [], ["</s>", "answer"]) == "The "  # a text stop complete first still wins
    assert generated_text(tok, ids, [], ["more"]) == tok.decode(ids)[:-4]  # the special token has no text
    assert generated_text(tok, ids, [], ["<s>"]) == tok.decode(ids)  # not in the ids
    spaced = tok.encode("stage 4")  # '▁' alone before the digit: a plain token that decodes to nothing here
    assert 28705 in spaced and generated_text(tok, spaced, [], ["\u2581"]) == "stage 4"  # its text: not found


def cj_errors():
    from cancerllm_jax import errors

    return errors


def test_unstacked_layers_decode_the_same(tiny):
    """The per-layer weight path (chosen on GPUs) gives the same tokens as the scan over stacked weights."""
    from cancerllm_jax.decode import Decoder

    _, lm = tiny
    prompts = [[1, 5, 9, 14, 3, 77, 12], [1, 8, 2, 6]]
    stacked = Decoder(lm, unstack=False).generate(prompts, max_new_tokens=9)
    unstacked = Decoder(lm, unstack=True).generate(prompts, max_new_tokens=9)
    assert stacked == unstacked


def test_every_eos_id_of_the_generation_config_stops(tiny, tmp_path):
    """Like transformers' generate, any id in generation_config.json's eos_token_id list ends a row."""
    import json
    import shutil

    model, lm = tiny
    prompt = [1, 5, 6, 7]
    free = lm.generate([prompt], max_new_tokens=6, eos_id=[])[0]  # no stopping at all
    stop = free[2]
    folder = tmp_path / "multi_eos"
    shutil.copytree(lm.source, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, int(stop)]}))
    lm2 = cj.load(str(folder), dtype="float32")
    assert set(lm2.eos_ids) == {2, int(stop)}
    got = lm2.generate([prompt], max_new_tokens=6)[0]
    first = next(i for i, t in enumerate(free) if t in (2, stop))
    assert got == free[:first + 1]
    assert got == hf_greedy(model, prompt, 6, eos=[2, int(stop)])
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(cj_errors().UserError, match="generation_config.json"):
        cj.load(str(folder), dtype="float32")
    # these were ignored (no stop where HF stops); Infinity crashed as a bug
    for bad in ('"2"', '[2, "32000"]', "[2, 3.5]", "true", '{"id": 2}', "[2, Infinity]", "NaN"):
        (folder / "generation_config.json").write_text(f'{{"eos_token_id": {bad}}}')
        with pytest.raises(cj_errors().UserError, match="generation_config.json: eos_token_id must be a token id"):
            cj.load(str(folder), dtype="float32")
    (folder / "generation_config.json").write_text("[2]")
    with pytest.raises(cj_errors().UserError, match="generation_config.json: expected a JSON object"):
        cj.load(str(folder), dtype="float32")


def test_shared_prefix_decodes_like_each_prompt_alone(tiny):
    """Rows sharing a long prefix (prefilled once, batch 1, then copied into every row's cache) give the tokens
    each prompt gives alone and transformers gives, past the window (5); the shared path is really taken."""
    from cancerllm_jax.decode import Decoder, shared_prefix_length

    model, lm = tiny
    rng = np.random.default_rng(11)
    head = [1] + rng.integers(3, 96, size=36).tolist()
    prompts = [head + rng.integers(3, 96, size=n).tolist() for n in (5, 1, 12, 3)]
    assert shared_prefix_length(prompts) == 32
    assert shared_prefix_length([head, head + [7]]) == 32  # every row keeps a token of its own
    assert shared_prefix_length([head[:20] + [5], head[:20] + [6]]) == 16
    assert shared_prefix_length([head]) == 0 and shared_prefix_length([[1, 2], [3, 2]]) == 0
    shared = Decoder(lm, share_prefix=True)
    got = shared.generate(prompts, max_new_tokens=7)
    assert any(k[1] == 32 for k in shared._fns)
    assert got == [lm.generate([p], max_new_tokens=7)[0] for p in prompts]
    assert got == Decoder(lm, share_prefix=False).generate(prompts, max_new_tokens=7)
    for p, g in zip(prompts, got):
        assert g == hf_greedy(model, p, 7)


def test_bucket_lengths_pad_at_most_a_quarter():
    from cancerllm_jax.decode import bucket_length

    assert [bucket_length(n) for n in (1, 16, 17, 68, 100, 119, 129, 442, 513, 1500)] == \
        [16, 16, 32, 80, 112, 128, 160, 448, 640, 1536]
    for n in range(1, 5000, 7):
        b = bucket_length(n)
        assert b >= n and b % 16 == 0 and (b - n) <= max(15, n // 4)


def test_top_k_past_the_vocabulary_keeps_every_token(tiny):
    _, lm = tiny
    a = lm.generate([[1, 5, 6]], max_new_tokens=6, temperature=0.9, top_k=10_000, seed=3)
    b = lm.generate([[1, 5, 6]], max_new_tokens=6, temperature=0.9, top_k=0, seed=3)
    assert a == b
    with pytest.raises(cj_errors().UserError, match="top_k"):
        lm.generate([[1, 5, 6]], max_new_tokens=2, temperature=0.9, top_k=-1)


def test_warped_logits_keep_the_tokens_transformers_warpers_keep():
    """Temperature -> top-k -> top-p on random logits (ties, -inf, a peaked row, k past the vocabulary) keep exactly
    the tokens TemperatureLogitsWarper/TopKLogitsWarper/TopPLogitsWarper keep: top_p=1 keeps every token (a
    float32 sum reaches 1 before the tail), and ties at the nucleus boundary break as transformers' sort does."""
    import jax.numpy as jnp
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from cancerllm_jax.decode import nucleus_drop_mass, warp_logits

    def hf(x, t, k, p):
        s = TemperatureLogitsWarper(t)(None, torch.tensor(x))
        s = TopKLogitsWarper(min(k, x.shape[1]))(None, s) if k else s
        return (TopPLogitsWarper(p)(None, s) if p < 1 else s).numpy()

    rng = np.random.default_rng(0)
    for trial in range(48):
        v = (5, 16, 1000, 5000)[trial % 4]
        x = rng.standard_normal((3, v)) * (0.5, 3, 10)[trial % 3]
        x[0] = rng.integers(-2, 2, size=v) if v <= 16 else x[0]  # ties (transformers' sort is stable to 16)
        x[1, rng.random(v) < 0.4] = -np.inf
        x[2, 0] = 40  # one dominant token
        x = x.astype(np.float32)
        t, k, p = (0.5, 0.7, 1.0, 1.3)[trial % 4], (0, 1, 3, 50, 10**6)[trial % 5], (0.1, 0.5, 0.9, 1.0)[trial // 12]
        want = hf(x, t, k, p)
        got = np.asarray(warp_logits(jnp.asarray(x), jnp.float32(t), k, jnp.float32(nucleus_drop_mass(p))))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=f"t={t} k={k} p={p} v={v}")
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
    tied = np.asarray(warp_logits(jnp.asarray([[1.0, 1.0, 1.0, 0.0]]), 1.0, 0, nucleus_drop_mass(0.3)))
    assert np.isfinite(tied).tolist() == [[False, True, True, False]]


def test_first_argmax_equals_argmax_with_ties():
    import jax.numpy as jnp

    from cancerllm_jax.decode import first_argmax

    rng = np.random.default_rng(5)
    x = rng.integers(-3, 4, size=(64, 300)).astype(np.float32)  # many ties
    x[3] = -np.inf
    x[4, 7] = np.inf
    got = np.asarray(first_argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32


def test_string_prompts_get_bos_unless_asked_not_to(tiny):
    """``[bos] + prompt`` by default (the training framing); ``add_bos=False``: the text's ids alone."""
    from cancerllm_jax.data.tokenizer import load_tokenizer

    _, lm = tiny
    tok = load_tokenizer(None)
    text = "pt w/ nsclc"
    with_bos, without = tok.encode(text, bos=True), tok.encode(text)
    assert with_bos[0] == tok.bos_id and with_bos[1:] == without
    ids = [t % 96 for t in with_bos]
    lm.tokenizer = _ModTokenizer(tok)
    try:
        assert lm.generate([text], max_new_tokens=3, eos_id=[]) == [lm.tokenizer.decode(g) for g in
                                                                   lm.generate([ids], max_new_tokens=3, eos_id=[])]
        assert lm.tokenizer.special  # a prompt is read as tokenizer(text) reads it, chat-template tokens included
        assert lm.generate([text], max_new_tokens=3, eos_id=[], add_bos=False) == [
            lm.tokenizer.decode(g) for g in lm.generate([ids[1:]], max_new_tokens=3, eos_id=[])]
        for add_bos in (False, True):  # with a BOS, an empty text still is no prompt
            with pytest.raises(cj_errors().UserError, match="prompt 1 is empty"):
                lm.generate([text, ""], max_new_tokens=2, add_bos=add_bos)
        out = lm.generate([text], max_new_tokens=3, eos_id=[])[0]
        # a bare string is one stop string, not a set of characters: its first character alone cuts nothing
        assert lm.generate([text], max_new_tokens=3, eos_id=[], stop=out[0] + "z") == [out]
        stop = out.split(" ")[1]
        assert lm.generate([text], max_new_tokens=3, eos_id=[], stop=stop) == [out[:out.find(stop)]]
        for bad in (5, {"x"}, ["ok", 3], [""]):
            with pytest.raises(cj_errors().UserError, match="stop must be a non-empty string or a list of them"):
                lm.generate([text], max_new_tokens=2, stop=bad)
    finally:
        lm.tokenizer = None


class _ModTokenizer:
    """The Mistral v1 tokenizer with ids folded into the tiny model's 96-token vocabulary."""

    def __init__(self, tok):
        self.tok, self.eos_id, self.bos_id = tok, 2, 1

    def encode(self, text, bos=False, eos=False, special=False):
        self.special = special  # how the last text was read: special-token strings as the tokens (tokenizer(text))
        return [t % 96 for t in self.tok.encode(text, bos=bos, eos=eos)]

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


def test_prefill_groups_split_only_where_padding_pays():
    from cancerllm_jax.decode import prefill_groups

    assert prefill_groups([100] * 64) == [(0, 64, 112)]
    spread = sorted(range(10, 138, 2), reverse=True)  # 64 rows, 137 .. 10 tokens
    groups = prefill_groups(spread)
    assert [(s, e) for s, e, _ in groups] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert all(t >= max(spread[s:e]) for s, e, t in groups)
    assert prefill_groups(spread, data=3) == [(0, 64, 160)]  # groups must be whole shards of the data axis
    assert len(prefill_groups(sorted(range(2, 64, 4), reverse=True))) == 2  # 16 rows: groups of >= 8 rows


def test_grouped_prefill_of_spread_prompts_decodes_like_each_alone(tiny):
    """16 prompts of 2 .. 62 tokens sharing a 20-token head: prefilled in row groups of their own buckets (slots
    a group does not use stay empty between its prompts and the new tokens), then decoded together."""
    from cancerllm_jax.decode import Decoder

    model, lm = tiny
    rng = np.random.default_rng(4)
    head = [1] + rng.integers(3, 96, size=19).tolist()
    prompts = [head + rng.integers(3, 96, size=n).tolist() for n in range(2, 64, 4)]
    dec = Decoder(lm)
    got = dec.generate(prompts, max_new_tokens=6)
    assert any(k[0] == "join" for k in dec._fns)
    for p, g in zip(prompts, got):  # each alone in transformers (ours alone compiled 16 more shapes for nothing)
        assert g == hf_greedy(model, p, 6)


def test_a_new_shape_adds_a_compiled_function(tiny):
    """The evaluation runner counts ``Decoder._fns`` to tell which batches compiled: a repeated call adds none,
    a new prompt bucket adds some."""
    from cancerllm_jax.decode import Decoder

    _, lm = tiny
    dec = Decoder(lm)
    dec.generate([[1, 5, 6], [1, 7]], max_new_tokens=3)
    n = len(dec._fns)
    dec.generate([[1, 9, 6], [1, 8]], max_new_tokens=3)
    assert len(dec._fns) == n
    dec.generate([[1] + list(range(3, 40)), [1, 8]], max_new_tokens=3)
    assert len(dec._fns) > n


def test_prefill_options_fall_back_when_xla_lacks_the_flag(monkeypatch):
    from cancerllm_jax import decode

    decode.cpu_prefill_options.cache_clear()
    monkeypatch.setattr(decode, "PREFILL_CPU_OPTIONS", {"xla_cpu_no_such_flag_for_test": ""})
    try:
        assert decode.cpu_prefill_options() == {}
    finally:
        decode.cpu_prefill_options.cache_clear()


def test_a_mistral_folder_with_a_plain_fast_tokenizer_loads(tmp_path):
    """transformers 5 routes a mistral config.json's tokenizer to mistral-common's tekken class (it needs
    tiktoken); a folder whose tokenizer.json is a plain fast tokenizer still loads, with the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefgh ")}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # as Mistral's
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    lm = cj.load(str(tmp_path))
    assert lm.tokenizer.encode("bad cafe", bos=True) == [1] + fast.encode("bad cafe", add_special_tokens=False)
    assert lm.tokenizer.encode("bad cafe", bos=True) == fast("bad cafe")["input_ids"]
    assert lm.tokenizer.decode(lm.tokenizer.encode("bad cafe")) == "bad cafe"


def test_a_last_smaller_batch_never_exceeds_batch_size(tiny):
    """The last batch pads to a power of two rows (few compiled shapes), but never past ``batch_size``: 11 prompts
    in batches of 6 are decoded as 6 + 6 rows, not 6 + 8."""
    from cancerllm_jax.decode import Decoder

    _, lm = tiny
    prompts = [[1, 5 + i, 6] for i in range(11)]
    dec = Decoder(lm)
    got = dec.generate(prompts, max_new_tokens=3, batch_size=6)
    assert {k[5] for k in dec._fns if k[0] == "decode"} == {6}
    assert got == [lm.generate([p], max_new_tokens=3)[0] for p in prompts]


def _generate_cli():
    import importlib.util
    import os
    import sys

    launch = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
    sys.path.insert(0, launch)
    try:
        spec = importlib.util.spec_from_file_location("generate_cli_for_test", os.path.join(launch, "generate.py"))
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
    finally:
        sys.path.remove(launch)
    return cli


def test_generate_cli_refuses_an_empty_prompt_even_with_a_bos():
    """``{"prompt": ""}`` is a bad record naming its line (found before the model loads), for tokenizers with a
    BOS (Mistral's: ``[bos]`` alone) as without."""
    from cancerllm_jax.data.tokenizer import load_tokenizer

    cli = _generate_cli()
    tok = load_tokenizer(None)
    assert tok.encode("", bos=True) == [tok.bos_id]
    cli._check_fields("in.jsonl", {"prompt": "x", "_line": 2})
    with pytest.raises(cj_errors().UserError, match="in.jsonl:3: the prompt is empty"):
        cli._check_fields("in.jsonl", {"prompt": "", "_line": 3})


def test_generate_cli_refuses_a_prompt_beside_an_instruction_or_context():
    """A record with ``prompt`` and ``context`` (or ``instruction``) is ambiguous: an error naming its line, not
    a context silently left out of the prompt."""
    cli = _generate_cli()
    cli._check_fields("in.jsonl", {"prompt": "x", "_line": 1})
    cli._check_fields("in.jsonl", {"instruction": "x", "context": "y", "_line": 2})
    for extra in ({"context": "y"}, {"instruction": "y"}):
        with pytest.raises(cj_errors().UserError, match="in.jsonl:4: has a 'prompt' and an 'instruction'"):
            cli._check_fields("in.jsonl", {"prompt": "x", "_line": 4, **extra})
    with pytest.raises(cj_errors().UserError, match="in.jsonl:5: field 'input' is not read"):  # Alpaca's name
        cli._check_fields("in.jsonl", {"instruction": "x", "input": "the note", "_line": 5})


def test_generate_cli_warns_of_a_field_spelled_another_way(tmp_path, capsys, caplog, monkeypatch):
    """A misspelled optional field (``contxt``, ``Response``, Alpaca's ``output``) was dropped silently (a prompt
    without its note, a row without its gold): a warning names the file, first line, field and the right name.
    A user's own metadata (``context_id``, ``responded: true``, ``idx``) is not named."""
    import logging

    cli = _generate_cli()
    path = tmp_path / "in.jsonl"
    rows = [{"id": "a", "prompt": "fine", "context_id": "c1", "responded": True, "idx": 4},
            {"id": "b", "instruction": "Dx?", "contxt": "note"}, {"id": "c", "prompt": "p", "Response": "g"},
            {"id": "d", "prompt": "p", "output": "g"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(cli, "_generate", lambda *a: 0)  # the records as read and checked; no model needed
    with caplog.at_level(logging.WARNING):
        code = cli.main(["--model", str(tmp_path), "--input", str(path), "--out", str(tmp_path / "o.jsonl")])
    assert code in (0, None), capsys.readouterr().err
    text = caplog.text
    for line, stray, right in ((2, "contxt", "context"), (3, "Response", "response"), (4, "output", "response")):
        assert f"in.jsonl:{line}: field '{stray}' is not read" in text and f"rename it to '{right}'" in text, text
    assert "context_id" not in text and "responded" not in text and "'idx'" not in text, text


def test_generate_cli_names_the_records_it_skips(capsys):
    """With --skip-bad-lines, records refused after reading (empty prompt, too long, ...) are counted and the first
    five named on stderr, as read_jsonl names the bad lines it skips."""
    cli = _generate_cli()

    def make(r):
        if r["_line"] % 2 == 0:
            raise cj_errors().UserError(f"in.jsonl:{r['_line']}: bad")
        return r["_line"]

    kept, made, refused = cli._keep_good([{"_line": i} for i in range(1, 16)], True, make)
    assert refused == 7 and made == list(range(1, 16, 2)) == [r["_line"] for r in kept]
    err = capsys.readouterr().err
    assert err.count("skipping in.jsonl:") == 5 and "in.jsonl:2: bad" in err and "in.jsonl:12" not in err
    with pytest.raises(cj_errors().UserError, match="in.jsonl:2: bad"):
        cli._keep_good([{"_line": i} for i in range(1, 4)], False, make)


def test_generate_cli_names_lines_as_evaluate_does_and_hashes_the_prompt_it_feeds(tmp_path, capsys):
    """A line without an id is ``line<N>`` (it was ``in.jsonl:N``, which `score` cannot pair with an id-less gold
    file except by line order); a prompt whose context is cut is hashed as the text the model sees (it hashed the
    uncut text, unlike `evaluate.py run`); an empty instruction is refused as training refuses it."""
    import json

    from cancerllm_jax.data.tokenizer import load_tokenizer
    from cancerllm_jax.eval.tasks import build_prompt, get_task

    torch.manual_seed(0)
    model_dir = tmp_path / "m"
    transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).save_pretrained(model_dir, safe_serialization=True)
    long_note = "Patient with stage IV adenocarcinoma of the lung. " * 40
    rows = [{"instruction": "Give the diagnosis.", "context": long_note, "response": "lung cancer"},
            {"instruction": "Give the diagnosis.", "context": "pt w/ nsclc", "response": "nsclc"}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = _generate_cli()
    assert cli.main(["--model", str(model_dir), "--input", str(inp), "--out", str(out), "--max-new-tokens", "1",
                     "--max-prompt-tokens", "100"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in got] == ["line1", "line2"]
    spec = get_task("diagnosis").with_limits(max_input_tokens=100)
    want = build_prompt(load_tokenizer(None), {**rows[0], "id": "line1"}, spec)
    assert want.context_tokens_cut > 0 and got[0]["prompt_hash"] == want.hash
    # a raw prompt cut to --max-prompt-tokens is hashed as what the model sees too (it hashed the whole text, so two
    # cuts that fed the model different tokens had one hash)
    inp.write_text(json.dumps({"prompt": long_note}) + "\n")
    hashes = []
    for budget in ("50", "5", "5"):
        assert cli.main(["--model", str(model_dir), "--input", str(inp), "--out", str(out), "--max-new-tokens", "1",
                         "--max-prompt-tokens", budget, "--overwrite"]) == 0
        hashes.append(json.loads(out.read_text())["prompt_hash"])
    assert hashes[0] != hashes[1] == hashes[2]
    # some lines with an id, some without (was refused: "give every line an id, or none"; `evaluate.py run` and
    # `score` take such a file, naming the id-less line line<N>)
    inp.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"id": 7, "prompt": "b"}) + "\n")
    assert cli.main(["--model", str(model_dir), "--input", str(inp), "--out", str(out), "--max-new-tokens", "1",
                     "--overwrite"]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["line1", 7]
    with pytest.raises(cj_errors().UserError, match="in.jsonl:3: field 'instruction' is empty"):
        cli._check_fields("in.jsonl", {"instruction": " ", "_line": 3})


def test_generate_cli_refuses_to_write_over_its_input(tmp_path, capsys):
    """``--out`` naming the ``--input`` file (even with ``--overwrite``) is an error before anything loads, not the
    prompts silently replaced by the predictions."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "x"}\n')
    with pytest.raises(SystemExit) as e:
        _generate_cli().main(["--model", str(tmp_path / "none"), "--input", str(inp), "--out", str(inp),
                              "--overwrite"])
    assert e.value.code == 2 and "is the --input file" in capsys.readouterr().err
    assert inp.read_text() == '{"prompt": "x"}\n'


def test_positions_past_max_position_embeddings_warn_once_and_decode_as_transformers(tiny, caplog):
    """Prompt + new tokens past the model's max_position_embeddings (256 here) run as in transformers (RoPE goes on),
    with one warning that the model was not trained for those positions (it was silent)."""
    import logging

    model, lm = tiny
    prompt = [1] + [int(t) for t in np.random.default_rng(5).integers(3, 96, size=249)]
    with caplog.at_level(logging.WARNING, logger="cancerllm_jax.decode"):
        assert lm.generate([prompt], max_new_tokens=3, eos_id=[])[0] == hf_greedy(model, prompt, 3, eos=None)
        assert "max_position_embeddings" not in caplog.text  # 252 positions
        got = lm.generate([prompt], max_new_tokens=12, eos_id=[])[0]
        lm.generate([prompt], max_new_tokens=12, eos_id=[])
    assert got == hf_greedy(model, prompt, 12, eos=None)
    assert caplog.text.count("past the model's max_position_embeddings (256)") == 1, caplog.text
