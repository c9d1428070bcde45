"""LSTM / GRU language models (fastlm.models.rnn) and the contiguous streams they train on
(fastlm.data.corpus.TokenStreams): shapes, learning, the carried hidden state, stream layout and
resume, checkpoint resume through python -m fastlm.train, and state-carrying generation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastlm import checkpoint, models
from fastlm.config import ModelConfig, parse_args
from fastlm.data.text import TextData
from fastlm.tokenizer import Tokenizer
from fastlm.train.loop import main
from fastlm.data.corpus import DataError, TextCorpus, load_data

ARCHS = ["lstm", "gru"]


def make(arch: str, **kw) -> models.LanguageModel:
    cfg = {"arch": arch, "preset": "", "vocab_size": 64, "block_size": 16, "n_layer": 2,
           "n_embd": 24, "dropout": 0.0}
    return models.build(ModelConfig(**{**cfg, **kw}))


# ---------------------------------------------------------------------------------------------
# The model
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_state(arch):
    m = make(arch)
    assert arch in models.available() and m.recurrent and m.objective == "causal"
    assert m.checkpoint_units() == []
    idx = torch.randint(0, 64, (3, 11))
    logits, loss = m(idx)
    assert logits.shape == (3, 11, 64) and loss is None
    logits, loss, state = m(idx, idx, return_state=True)
    assert logits is None and loss.shape == () and loss.requires_grad
    assert len(state) == (2 if arch == "lstm" else 1)
    assert all(s.shape == (2, 3, 24) for s in state)
    assert m(idx, last_only=True)[0].shape == (3, 1, 64)
    # The loss is the cross-entropy of the logits it does not materialise.
    logits, loss = m(idx, idx, return_logits=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 64), idx.reshape(-1)))
    with pytest.raises(ValueError, match=r"state must be .* \(n_layer, B, n_embd\) = \(2, 3, 24\)"):
        m(idx, state=tuple(s[:, :2] for s in state))
    # Tied head: one table; the count holds it once.
    assert m.lm_head.weight is m.wte.weight
    assert m.num_params() == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_flops_per_token_counts_the_matmuls(arch):
    m = make(arch)
    matmul_weights = sum(p.numel() for n, p in m.rnn.named_parameters() if n.startswith("weight"))
    matmul_weights += m.lm_head.weight.numel()
    assert m.flops_per_token(16) == m.flops_per_token(1000) == 6 * matmul_weights


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_falls_on_an_overfit_batch(arch):
    m = make(arch)
    idx = torch.randint(0, 64, (4, 16))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-2)
    first = None
    for _ in range(80):
        _, loss = m(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.9  # ~ln(64) = 4.16 at the start
    assert loss.item() < 0.3 * first  # 60 random targets memorised (~0.5 by step 80)


@pytest.mark.parametrize("arch", ARCHS)
def test_carried_state_equals_one_pass(arch):
    """Two chunks with the state carried give the logits, loss and final state of one pass."""
    m = make(arch, dropout=0.2).eval()  # eval: dropout off, so both runs are deterministic
    idx = torch.randint(0, 64, (3, 20))
    full, _, s_full = m(idx, state=None, return_state=True)  # (3, 20, V)
    a, _, s = m(idx[:, :7], return_state=True)
    b, _, s = m(idx[:, 7:], state=s, return_state=True)
    torch.testing.assert_close(torch.cat((a, b), 1), full, rtol=1e-5, atol=1e-6)
    for got, want in zip(s, s_full):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Without the carry the second chunk forgets the first: the state matters.
    b0 = m(idx[:, 7:])[0]
    assert (b0 - full[:, 7:]).abs().max() > 1e-3


def test_state_from_bf16_autocast_feeds_an_fp32_step():
    """The trainer carries a state made under bf16 autocast; eval/generation run in fp32."""
    m = make("lstm")
    idx = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss, s = m(idx, idx, return_state=True)
    assert torch.isfinite(loss)
    logits, _, s2 = m(idx, state=s, return_state=True)
    assert logits.dtype == torch.float32 and s2[0].dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_carried_state_equals_windowless_greedy(arch):
    m = make(arch).eval()
    prompt = torch.randint(0, 64, (2, 5))
    out = m.generate(prompt, 12, top_k=1)  # top_k=1: greedy
    ref = prompt
    for _ in range(12):  # the reference re-runs the whole sequence from a zero state each step
        logits = m(ref)[0][:, -1]  # (B, V)
        ref = torch.cat((ref, logits.argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, ref)
    assert out.shape == (2, 17)  # longer than block_size 16: no window limit


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_cached_with_left_padding(arch):
    """fastlm.generate's interface: a left-padded prefill then one-token steps give each row
    what running its own prompt alone gives."""
    m = make(arch).eval()
    prompts = [torch.randint(0, 64, (n,)) for n in (6, 2, 4)]
    idx = torch.zeros(3, 6, dtype=torch.long)
    pad = torch.ones(3, 6, dtype=torch.bool)
    for r, p in enumerate(prompts):
        idx[r, 6 - len(p):], pad[r, 6 - len(p):] = p, False
    cache = m.new_cache(3, 10)
    cache.set_padding(pad)
    assert cache.mask(6) is None
    logits = m.forward_cached(idx, cache, last_only=True)  # (3, 1, V)
    nxt = torch.randint(0, 64, (3, 1))
    step = m.forward_cached(nxt, cache)  # (3, 1, V)
    assert cache.length == 7
    for r, p in enumerate(prompts):
        alone = m(torch.cat((p, nxt[r]))[None])[0]  # (1, len + 1, V)
        torch.testing.assert_close(logits[r, -1], alone[0, -2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step[r, -1], alone[0, -1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exceed the cache's 10 positions"):
        m.forward_cached(torch.zeros(3, 4, dtype=torch.long), cache)


# ---------------------------------------------------------------------------------------------
# Streams
def arange_corpus(n: int, rank: int = 0, world: int = 1) -> TextCorpus:
    """A corpus whose token i is i: every read says where it came from."""
    data = TextData(torch.arange(n, dtype=torch.int32), torch.arange(50, dtype=torch.int32), "t",
                    vocab_size=n)
    corpus = TextCorpus(data, Tokenizer.byte(), "arange")
    corpus.rank, corpus.world_size = rank, world
    return corpus


def test_stream_rows_are_contiguous_across_calls_and_wrap():
    c = arange_corpus(101)  # M = 100 input positions, 4 streams of L = 25
    assert c.state_dict() == {}  # unused streams leave the state as it was
    B, T = 4, 10
    x0, _ = c.stream_batch(B, T)
    assert x0[:, 0].tolist() == [0, 25, 50, 75]
    for k in range(1, 12):  # 12 calls x 10 tokens: every row passes a stream boundary
        x, y = c.stream_batch(B, T)
        expected = (torch.tensor([0, 25, 50, 75])[:, None] + k * T + torch.arange(T)) % 100
        assert torch.equal(x, expected)
        assert torch.equal(y, x + 1)  # the true next token, also where a row wraps at 100 -> 0
    assert c.state_dict()["streams"] == {"pos": 20, "streams": 4, "positions": 100}


def test_stream_state_dict_round_trip_and_checks():
    a = arange_corpus(500)
    for _ in range(3):
        a.stream_batch(4, 16)
    state = json.loads(json.dumps(a.state_dict()))  # plain data
    b = arange_corpus(500)
    b.load_state_dict(state)
    for _ in range(5):
        xa, ya = a.stream_batch(4, 16)
        xb, yb = b.stream_batch(4, 16)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(DataError, match="Resume with the same data"):
        arange_corpus(400).load_state_dict(state)
    with pytest.raises(DataError, match="number of streams\\) cannot change"):
        b.stream_batch(8, 16)
    with pytest.raises(DataError, match="4 tokens per stream, fewer than seq_len = 16"):
        arange_corpus(500).stream_batch(100, 16)


def test_stream_ranks_take_their_slice_of_the_global_streams():
    one = arange_corpus(1000)
    ranks = [arange_corpus(1000, r, 2) for r in range(2)]
    for _ in range(4):
        x, y = one.stream_batch(6, 8)
        parts = [c.stream_batch(3, 8) for c in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    # A 2-process checkpoint resumes in 1 process with the same global streams.
    single = arange_corpus(1000)
    single.load_state_dict(ranks[0].state_dict())
    assert torch.equal(single.stream_batch(6, 8)[0], one.stream_batch(6, 8)[0])


def test_shard_corpus_streams_cross_shards(tmp_path):
    from fastlm.data.shards import write_llmc_shard
    tokens = np.arange(3000) % 257
    write_llmc_shard(tmp_path / "data_train_000.bin", tokens[:1200])
    write_llmc_shard(tmp_path / "data_train_001.bin", tokens[1200:])
    write_llmc_shard(tmp_path / "data_val_000.bin", tokens[:600])
    cfg = parse_args([f"--data={tmp_path}", "--train.batch_size=2", "--model.block_size=32",
                      "--eval.batches=2"])
    corpus, _ = load_data(cfg)
    try:
        seen = []
        for _ in range(40):  # stream 0 crosses from shard 0 into shard 1 at token 1200
            x, y = corpus.stream_batch(2, 32)
            seen.append(x)
            assert torch.equal(y % 257, (x + 1) % 257)
        row0 = torch.cat([s[0] for s in seen])
        assert torch.equal(row0, torch.arange(len(row0)) % 257)
        state = corpus.state_dict()
        assert "loader" in state and state["streams"]["pos"] == 40 * 32
        again, _ = load_data(cfg)
        again.load_state_dict(state)
        assert torch.equal(again.stream_batch(2, 32)[0], corpus.stream_batch(2, 32)[0])
        again.close()
    finally:
        corpus.close()


# ---------------------------------------------------------------------------------------------
# Through the trainer
TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\n") * 40  # ~5 KB

TINY = ["--model.n_layer=2", "--model.n_embd=32", "--model.block_size=32",
        "--train.batch_size=4", "--optim.lr=1e-2", "--optim.warmup_steps=5",
        "--eval.batches=2", "--train.log_interval=2", "--train.progress=false",
        "--eval.interval=6", "--sample.tokens=0", "--train.grad_accum=2"]


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path, arch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    common = [f"--data={corpus}", f"--model.preset=tiny-{arch}", *TINY]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight), "--train.max_steps=12"]) == 0
    assert main([*common, "--out", str(split), "--train.max_steps=6"]) == 0
    state = checkpoint.load(split).train_state()
    assert len(state["carry"]) == (2 if arch == "lstm" else 1)  # the TBPTT state is saved
    assert state["data"]["streams"]["pos"] == 6 * 2 * 32  # steps x micro-batches x T
    assert main([*common, "--out", str(split), "--train.max_steps=12", "--resume"]) == 0
    a, b = checkpoint.load(straight), checkpoint.load(split)
    assert a.step == b.step == 12
    from safetensors.torch import load_file
    wa, wb = (load_file(c.path / "model.safetensors") for c in (a, b))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)
    assert train_rows(split) == train_rows(straight)  # the whole loss curve, bit for bit
    losses = [loss for _, loss in train_rows(straight)]
    assert losses[-1] < losses[0]
