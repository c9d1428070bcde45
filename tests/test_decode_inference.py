"""Decoding runs under torch.inference_mode for speed; what it must not change: greedy tokens
equal the argmax of full (uncached) forwards, packed or not, and the model and the decoders'
buffers stay ordinary tensors, so training, a second generation and continuous batching's row
moves (made outside any step) still work afterwards."""
import pytest
import torch

from fastlm.generate.decode import BatchDecoder, ContinuousDecoder, SamplingParams
from fastlm.models.packed_linear import pack_linears, unpack_linears
from fastlm.tokenizer import Tokenizer
from tests.lm_fixtures import tiny_model

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def full_forward_greedy(model, prompt, new):
    """The reference: every token from a fresh forward over the whole sequence, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def decode(model, prompts):
    dec = BatchDecoder(model, prompts, GREEDY)
    while not dec.done:
        dec.step()
    return dec.tokens


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("packed", [False, True])
def test_greedy_tokens_equal_full_forward(arch, packed):
    model = tiny_model(arch)
    if packed:
        pack_linears(model)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (7, 7, 13)]
    want = [full_forward_greedy(model, p, 12) for p in prompts]
    assert decode(model, prompts[:2]) == want[:2]  # unpadded batch
    assert decode(model, prompts) == want  # left-padded batch
    unpack_linears(model)


def test_model_trains_and_decodes_again_after_decoding():
    model = tiny_model("gpt2")
    pack_linears(model)
    prompts = [[1, 2, 3, 4]]
    first = decode(model, prompts)
    model.train()
    _, loss = model(torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (2, 9)))
    loss.backward()  # no inference tensor got into the model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-1.0)
    model.eval()
    second = decode(model, prompts)  # the changed weights are repacked
    assert second[0] == full_forward_greedy(model, prompts[0], 12) and second != first


def test_continuous_rows_move_between_steps():
    """cancel() moves the last row into the freed slot outside inference_mode: the decoder's
    buffers must accept that in-place copy, and the moved row keeps its greedy text."""
    model = tiny_model("gpt2")
    dec = ContinuousDecoder(model, Tokenizer.byte(), slots=3)
    prompts = {7: [5, 6, 7], 8: [9, 10, 11, 12], 9: [1, 2]}
    got = {k: [] for k in prompts}
    for key, p in prompts.items():
        got[key] += [e.token for e in dec.add(p, SamplingParams(max_new_tokens=8,
                                                                temperature=0), key)]
    for e in dec.step():
        got[e.row].append(e.token)
    dec.cancel(7)  # row 0 leaves; key 9's row moves into slot 0
    while dec.active:
        for e in dec.step():
            if e.token is not None:
                got[e.row].append(e.token)
    for key in (8, 9):
        assert got[key] == full_forward_greedy(model, prompts[key], 8)
