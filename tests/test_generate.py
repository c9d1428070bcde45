"""KV-cache generation: cached logits equal a full forward (both flavours), padded batches equal
single prompts, continuous batching (rows joining and leaving mid-run) equals single prompts,
sampling filters, seeds, stop strings and ids, incremental text, limits, the CLI."""
import pytest
import torch

from fastlm.generate.decode import (
    BatchDecoder,
    ContinuousDecoder,
    SamplingParams,
    TextStream,
    generate,
    main,
    next_tokens,
)
from fastlm.generate.kv_cache import KVCache, SlotCache
from fastlm.restore import load
from fastlm.tokenizer import Tokenizer
from tests.lm_fixtures import save_checkpoint, tiny_model
from tests.utils import assert_lowp_close

ARCHS = ["gpt2", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_logits_equal_full_forward(arch):
    model = tiny_model(arch)
    idx = torch.randint(0, 256, (3, 37))  # (B, T)
    full, _ = model(idx)  # (B, T, V)
    cache = KVCache(model.config, 3, 40)
    k_ptr = cache.k.data_ptr()
    chunks = [model.forward_cached(idx[:, :11], cache)]  # prefill
    for t in range(11, 30):  # one token at a time
        chunks.append(model.forward_cached(idx[:, t:t + 1], cache))
    chunks.append(model.forward_cached(idx[:, 30:], cache))  # a chunk after decoding
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 37 and cache.k.data_ptr() == k_ptr  # written in place
    with pytest.raises(ValueError, match="exceed the cache"):
        model.forward_cached(idx[:, :4], cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_logits_bfloat16(arch):
    """bf16 decoding (one-token steps take the upcast-SDPA path) stays within 2x the error of
    the bf16 full forward against the float32 model."""
    model = tiny_model(arch)
    idx = torch.randint(0, 256, (3, 30))  # (B, T)
    with torch.no_grad():
        reference = model(idx)[0]  # float32
        model.to(torch.bfloat16)
        full = model(idx)[0]
        cache = KVCache(model.config, 3, 30, torch.bfloat16)
        chunks = [model.forward_cached(idx[:, :10], cache)]
        chunks += [model.forward_cached(idx[:, t:t + 1], cache) for t in range(10, 30)]
    assert_lowp_close(torch.cat(chunks, 1), reference, full, f"{arch} bf16 cached logits")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_cache_logits_equal_full_forward(arch, dtype):
    """Continuous batching's layout: rows of different lengths (one joining late, into a slot
    another row left) decode together, each at its own position, and every row's logits equal
    the full forward over its own tokens (float32 tight; bf16 within 2x its own error)."""
    model = tiny_model(arch)
    seqs = [torch.randint(0, 256, (n,)) for n in (12, 20, 14)]
    with torch.no_grad():
        reference = [model(s[None])[0][0] for s in seqs]  # float32 (T, V) each
        model.to(dtype)
        lowp = [model(s[None])[0][0] for s in seqs]
        cache = SlotCache(model.config, 3, 24, dtype)
        got: list[list[torch.Tensor]] = [[], [], []]
        order = {}  # slot -> sequence
        for j, P in ((0, 6), (1, 3)):  # two rows prefilled, of different lengths
            r, view = cache.claim()
            got[j].append(model.forward_cached(seqs[j][None, :P], view)[0])
            cache.set_length(r, P)
            order[r] = j
        for step in range(12):
            if step == 4:  # row 0 leaves early (row 1 moves into its slot); row 2 joins
                assert cache.release(0) == 1
                order[0] = order.pop(1)
                r, view = cache.claim()
                got[2].append(model.forward_cached(seqs[2][None, :5], view)[0])
                cache.set_length(r, 5)
                order[r] = 2
            pos = cache.lengths[:cache.active].tolist()
            idx = torch.stack([seqs[order[r]][pos[r]] for r in range(cache.active)])[:, None]
            view = cache.decode_view()
            logits = model.forward_cached(idx, view, mask=cache.mask())  # (n, 1, V)
            cache.commit(view)
            for r in range(cache.active):
                got[order[r]].append(logits[r])
    for j in range(3):
        out = torch.cat(got[j])  # (T_j, V): prefill rows then one per step
        T = out.shape[0]
        if dtype == torch.float32:
            torch.testing.assert_close(out, reference[j][:T], rtol=1e-5, atol=1e-5)
        else:
            assert_lowp_close(out, reference[j][:T], lowp[j][:T], f"{arch} row {j}")


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_single_prompts(arch):
    model = tiny_model(arch)
    prompts = [[5, 9, 200, 7, 7, 1, 30], [42], [3, 4, 5, 6]]
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    dec = BatchDecoder(model, prompts, greedy)
    assert dec.padded
    while not dec.done:
        dec.step()
    for r, p in enumerate(prompts):
        alone = BatchDecoder(model, [p], greedy)
        assert not alone.padded
        while not alone.done:
            alone.step()
        assert dec.tokens[r] == alone.tokens[0]
        # and both equal uncached greedy decoding with the plain forward
        seq = torch.tensor([p])
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
        assert alone.tokens[0] == seq[0, len(p):].tolist()
    assert dec.finish_reason == ["length"] * 3


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_prefill_logits_match(arch):
    model = tiny_model(arch)
    long, short = torch.randint(0, 256, (9,)).tolist(), torch.randint(0, 256, (4,)).tolist()
    dec = BatchDecoder(model, [long, short], SamplingParams(temperature=0, max_new_tokens=3))
    cache = dec.cache
    cache.set_padding(dec._pad)
    pos = ((~dec._pad).cumsum(1) - 1).clamp(min=0)
    logits = model.forward_cached(dec._idx, cache, pos, cache.mask(9))  # (2, 9, V)
    torch.testing.assert_close(logits[1, 5:], model(torch.tensor([short]))[0][0],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0], model(torch.tensor([long]))[0][0], rtol=1e-5, atol=1e-5)


def test_same_seed_same_text_and_batch_independent():
    model, tok = tiny_model("llama"), Tokenizer.byte()
    kw = {"max_new_tokens": 20, "temperature": 1.0, "top_k": 50, "top_p": 0.9, "seed": 123}
    a = generate(model, tok, "hello", **kw)
    assert generate(model, tok, "hello", **kw) == a
    assert generate(model, tok, "hello", **{**kw, "seed": 124}) != a
    # a row's text depends on its own seed only, not on what else is in the batch
    assert generate(model, tok, ["x", "hello", "a longer prompt"], **kw)[1] == a


def test_filters():
    logits = torch.randn(4, 50)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    greedy = logits.argmax(-1)
    for params in (SamplingParams(temperature=1, top_k=1), SamplingParams(temperature=5, top_p=1e-6),
                   SamplingParams(temperature=1, min_p=0.999), SamplingParams(temperature=0)):
        assert torch.equal(next_tokens(logits, [params] * 4, gens, None), greedy)
    top5 = logits.topk(5).indices
    for _ in range(20):
        got = next_tokens(logits, [SamplingParams(temperature=2, top_k=5)] * 4, gens, None)
        assert all(g in t for g, t in zip(got.tolist(), top5.tolist()))
    # repetition penalty: a seen winner loses against a close unseen runner-up
    lg = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    p = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert next_tokens(lg, [p], gens, seen).item() == 1
    assert next_tokens(lg, [SamplingParams(temperature=0)], gens, None).item() == 0


def _reference_candidates(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(V,) float64 probabilities after top-k, top-p and min-p, by sorting everything."""
    lg = logits.double() / p.temperature
    vals, order = lg.sort(descending=True)
    if p.top_k:
        vals[p.top_k:] = float("-inf")
    probs = torch.softmax(vals, -1)
    before = probs.cumsum(-1) - probs
    probs[1:][before[1:] >= p.top_p] = 0
    probs[probs < p.min_p * probs[0]] = 0
    out = torch.zeros_like(probs)
    out[order] = probs / probs.sum()
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05)])
@pytest.mark.parametrize("tail", [-8.0, -4.0])
def test_sampler_draws_the_filtered_distribution(params, tail):
    """Empirical frequencies over 4000 draws match the filtered softmax; filtered-out ids never
    appear. V = 600 with a peaked head: with the low tail top-p alone finds its nucleus in
    topk(256), with the high one it must sort everything."""
    logits = torch.full((600,), tail)
    logits[:8] = torch.tensor([3.0, 2.5, 2.2, 2.0, 1.0, 0.5, 0.2, 0.0])
    logits = logits[torch.randperm(600)]  # the head anywhere, not at the front
    want = _reference_candidates(logits, params)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(600, dtype=torch.float64)
    for _ in range(n):
        counts[next_tokens(logits[None], [params], [gen], None)[0]] += 1
    assert counts[want == 0].sum() == 0
    assert (counts / n - want).abs().max() < 0.03, (counts / n - want).abs().max()


def test_text_stream_stop_strings():
    tok = Tokenizer.byte()
    ts = TextStream(tok, stop=("END",))
    out = "".join(ts.push(b) for b in b"abc EN")
    assert out == "abc "  # "EN" held back: it may start "END"
    assert ts.push(ord("D")) == "" and ts.stopped and ts.text == "abc "
    ts = TextStream(tok, stop=("END",))
    out = "".join(ts.push(b) for b in b"ENx") + ts.flush()
    assert out == "ENx"
    ts = TextStream(tok)  # a multi-byte character is shown only once complete
    e = "é".encode()
    assert ts.push(e[0]) == "" and ts.push(e[1]) == "é"


def test_stop_ids_and_limits():
    model = tiny_model("gpt2")
    p = SamplingParams(temperature=0, max_new_tokens=8)
    dec = BatchDecoder(model, [[1, 2, 3]], p)
    while not dec.done:
        dec.step()
    first = dec.tokens[0][0]
    dec = BatchDecoder(model, [[1, 2, 3]], p, stop_ids=[first])
    assert dec.step() == [None] and dec.finish_reason == ["stop"] and dec.tokens == [[]]
    # the context limit ends a row with "length" even below max_new_tokens
    dec = BatchDecoder(model, [[1] * 60], SamplingParams(temperature=0, max_new_tokens=100))
    while not dec.done:
        dec.step()
    assert dec.finish_reason == ["length"] and len(dec.tokens[0]) == 5
    for bad, msg in (([[]], "empty"), ([[1] * 65], "context"), ([[300]], "outside")):
        with pytest.raises(ValueError, match=msg):
            BatchDecoder(model, bad, p)
    with pytest.raises(ValueError, match="temperature"):
        BatchDecoder(model, [[1]], SamplingParams(temperature=-1))


def test_load_and_cli(tmp_path, capsys):
    model = tiny_model("llama")
    save_checkpoint(tmp_path / "run", model)
    lm = load(tmp_path / "run")
    assert "byte tokenizer" in lm.meta.notes[0]
    want = generate(model, Tokenizer.byte(), "ab", max_new_tokens=6, temperature=0)
    assert generate(lm.model, lm.tokenizer, "ab", max_new_tokens=6, temperature=0) == want
    assert main(["--checkpoint", str(tmp_path / "run"), "--prompt", "ab", "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == "ab" + want + "\n"
    assert main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_chat_format_and_terminal_chat(tmp_path, monkeypatch, capsys):
    from fastlm.chat import cli as chat
    from fastlm.chat.template import PLAIN_STOP, format_plain
    assert format_plain([{"role": "system", "content": "Be kind."},
                         {"role": "user", "content": " hi "}]) == \
        "Be kind.\n\nUser: hi\nAssistant:"
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        format_plain([{"role": "bot", "content": "x"}])
    model = tiny_model("gpt2")
    save_checkpoint(tmp_path / "run", model)
    lines = iter(["hello", "/reset", "again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat.main(["--checkpoint", str(tmp_path / "run"), "--temperature", "0",
                      "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    want = generate(model, Tokenizer.byte(), "User: again\nAssistant:", max_new_tokens=8,
                    temperature=0, stop=PLAIN_STOP)
    assert out.out.count("bot> ") == 2 and out.out.endswith("bot> " + want + "\n")
    assert "tokens/s" in out.err


def test_padded_vocab_never_emits_undecodable_ids():
    model = tiny_model("gpt2", vocab_size=320, tie_embeddings=False)  # 64 ids past 256 bytes
    head = torch.nn.Linear(32, 320)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[256:] = 100.0  # make the padding ids the likeliest
    model.lm_head = head
    dec = BatchDecoder(model, [[1, 2]], SamplingParams(temperature=0, max_new_tokens=4))
    while not dec.done:
        dec.step()
    assert max(dec.tokens[0]) >= 256  # unconstrained, the padding ids win
    text = generate(model, Tokenizer.byte(), "ab", max_new_tokens=4, temperature=1.0, seed=0)
    assert len(text.encode("utf-8", "surrogateescape")) >= 1


def _solo(model, prompt, params):
    dec = BatchDecoder(model, [prompt], params)
    while not dec.done:
        dec.step()
    return dec.tokens[0], dec.finish_reason[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_continuous_batching_equals_single_prompts(arch):
    """Rows join while others are mid-answer, leave when done, and a freed slot (holding the
    last row's stale keys) is reused: every row's tokens equal its solo greedy decode."""
    model, tok = tiny_model(arch), Tokenizer.byte()
    prompts = [[5, 9, 200, 7, 7, 1, 30], [42], [3, 4, 5, 6], [100, 101], [7] * 20]
    params = [SamplingParams(max_new_tokens=9 + 2 * i, temperature=0) for i in range(5)]
    dec = ContinuousDecoder(model, tok, slots=3)
    k_ptr = dec.cache.k.data_ptr()
    events = dec.add(prompts[0], params[0], 0)
    for _ in range(3):
        events += dec.step()
    events += dec.add(prompts[1], params[1], 1)
    events += dec.step()
    events += dec.add(prompts[2], params[2], 2)
    assert dec.free == 0
    with pytest.raises(RuntimeError, match="slots"):
        dec.add(prompts[3], params[3], 3)
    waiting = [3, 4]
    while dec.active or waiting:
        while waiting and dec.free:
            r = waiting.pop(0)
            events += dec.add(prompts[r], params[r], r)
        events += dec.step()
    assert dec.cache.k.data_ptr() == k_ptr and dec.cache.active == 0
    for r, (p, sp) in enumerate(zip(prompts, params)):
        got = [e.token for e in events if e.row == r and e.token is not None]
        want, reason = _solo(model, p, sp)
        assert got == want, f"row {r}"
        ends = [e.finish_reason for e in events if e.row == r and e.finish_reason]
        assert ends == [reason]


def test_continuous_batching_sampling_cancel_and_limits():
    model, tok = tiny_model("llama", block_size=32), Tokenizer.byte()
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, seed=7,
                        repetition_penalty=1.3)
    want, _ = _solo(model, [1, 2, 3], sp)  # the same seed gives the same tokens in any batch
    dec = ContinuousDecoder(model, tok, slots=2)
    events = dec.add([9, 9, 9, 9], SamplingParams(max_new_tokens=30, temperature=0.7, seed=1), 0)
    events += dec.add([1, 2, 3], sp, 1)
    while 1 in dec.row_keys():
        events += dec.step()
    assert [e.token for e in events if e.row == 1 and e.token is not None] == want
    last = dec.cancel(0)
    assert [e.finish_reason for e in last] == ["cancelled"] and dec.active == 0
    assert dec.cancel(0) == []
    # the context ends a row with "length": after 30 prompt tokens in block_size 32, three new
    # ones (the last is predicted at position 31 and never fed back), as BatchDecoder does
    events = dec.add([5] * 30, SamplingParams(max_new_tokens=20, temperature=0), 2)
    while dec.active:
        events += dec.step()
    assert sum(e.token is not None for e in events) == 3 and events[-1].finish_reason == "length"
    with pytest.raises(ValueError, match="room for an answer"):
        dec.add([5] * 32, SamplingParams(), 3)
    with pytest.raises(ValueError, match="outside"):
        dec.add([999], SamplingParams(), 3)
    assert dec.active == 0  # a refused request holds no slot


def test_continuous_batching_stop_string():
    model, tok = tiny_model("gpt2"), Tokenizer.byte()
    free, _ = _solo(model, [65, 66], SamplingParams(max_new_tokens=12, temperature=0))
    text = tok.decode(free)
    stop = text[3:5]  # a stop string the greedy answer is known to contain
    dec = ContinuousDecoder(model, tok, slots=1)
    events = dec.add([65, 66], SamplingParams(max_new_tokens=12, temperature=0, stop=(stop,)), 0)
    while dec.active:
        events += dec.step()
    assert "".join(e.text for e in events) == text[:text.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_text_stream_incremental_equals_whole_decode():
    """O(1) per token, yet the same text as decoding everything: random byte streams with
    multi-byte characters, invalid bytes and stop strings."""
    tok = Tokenizer.byte()
    g = torch.Generator().manual_seed(0)
    pieces = [b"a", b"b", b"ab", "\u00e9".encode(), "\u20ac".encode(), "\U0001f600".encode(),
              b"\xff", b"\n", b"END", b"E"]
    for trial in range(200):
        data = b"".join(pieces[i] for i in torch.randint(0, len(pieces), (20,), generator=g))
        stop = (("END", "ab\u00e9") if trial % 2 else ())
        ts = TextStream(tok, stop)
        out = ""
        for b in data:
            out += ts.push(b)
            if ts.stopped:
                break
        out += ts.flush()
        whole = data.decode("utf-8", "replace")
        cut = min([i for i in (whole.find(s) for s in stop) if i >= 0], default=len(whole))
        assert out == whole[:cut] and ts.text == out, (data, stop)
