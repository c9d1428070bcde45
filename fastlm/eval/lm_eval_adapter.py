"""lm-evaluation-harness adapter: a fastlm checkpoint as an lm_eval model type "fastlm".

    pip install lm_eval
    python -m fastlm.lm_eval_adapter --model fastlm --model_args checkpoint=RUN_DIR \\
        --tasks hellaswag,arc_easy --batch_size 16

This module registers the model type when imported and then hands the command line to lm_eval's
own CLI (lm_eval discovers only its built-in models, so `python -m fastlm.lm_eval_adapter` stands
in for the `lm_eval` command; from Python, `import fastlm.eval.lm_eval_adapter` before
lm_eval.simple_evaluate(model="fastlm", ...) does the same).

FastLM is a TemplateLM, so requests are tokenized as lm_eval's own models tokenize them (the
context's trailing whitespace moves into the continuation; context + continuation is encoded once
and split where the context's own encoding ends; an empty context becomes <|endoftext|>), and
scored as lm_eval's `hf` model scores the Hugging Face export of the same checkpoint, to 1e-4 per
request (tests/test_interop_lm_eval.py):
  loglikelihood          fastlm.eval.core.loglikelihood, inputs cut to the last block_size + 1
  loglikelihood_rolling  lm_eval's disjoint windows of block_size tokens after <|endoftext|>
  generate_until         fastlm.generate.decode.stream, prompts batched, greedy unless the task
                         samples; the context keeps its last block_size - max_gen_toks tokens
Text is encoded as transformers encodes it: special tokens written in it are special tokens.
A generation option fastlm's decoder lacks (beam search, ...) is an error naming it.
"""
from __future__ import annotations

import logging
import sys

import torch

from fastlm.chat import template
from fastlm.command import run_command
from fastlm.eval.core import loglikelihood
from fastlm.generate.decode import SamplingParams, stream
from fastlm.restore import load

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # the module stays importable so the error says what to install
    TemplateLM, register_model, _IMPORT_ERROR = object, None, exc
else:
    _IMPORT_ERROR = None

log = logging.getLogger(__name__)

# lm_eval generation options the decoder has (after normalize_gen_kwargs), as SamplingParams
# fields; do_sample is folded into temperature (0 = greedy) by normalize_gen_kwargs.
GEN_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
               "min_p": "min_p", "repetition_penalty": "repetition_penalty", "seed": "seed"}


def _register(cls):
    return register_model("fastlm")(cls) if register_model is not None else cls


def pick_device(name: str | None) -> torch.device:
    """The device asked for, where it exists; lm_eval asks for cuda by default, so a CPU-only
    machine runs on the CPU (with a warning) instead of failing."""
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("fastlm: device %s asked for but torch sees no CUDA GPU; running on the CPU",
                    name)
        return torch.device("cpu")
    return device


@_register
class FastLM(TemplateLM):
    """lm_eval model over a fastlm checkpoint (model_args: checkpoint=PATH[,device=cpu]
    [,max_gen_toks=256][,tokenizer=tok.json])."""

    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int | str = 16,
                 max_gen_toks: int = 256, tokenizer: str | None = None, **_ignored):
        if _IMPORT_ERROR is not None:
            raise ImportError(f"fastlm's lm_eval model needs lm_eval (pip install lm_eval): "
                              f"{_IMPORT_ERROR}")
        super().__init__()
        self.model, self.tok, meta = load(checkpoint, pick_device(device), tokenizer=tokenizer)
        if meta.task == "classify":
            raise ValueError(f"{meta.path} is a classifier, not a language model")
        self.name = meta.name
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = self.model.config.block_size

    # ---- what TemplateLM asks of a model ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        # byte tokenizer without <|endoftext|>: id 0 stands in for it (as fastlm.eval does)
        return self.tok.eot_id if self.tok.eot_id is not None else 0

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string, allowed_special="all")  # no bos: fastlm prepends none
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        # longest first so each batch pads little; answers go back in request order
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        pairs = [(requests[i][1], requests[i][2]) for i in order]
        scores = loglikelihood(self.model, pairs, self.batch_size, progress=not disable_tqdm)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for i, s in zip(order, scores):
            out[i] = s
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        total = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            total[k] += ll
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same options decode together
        for k, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(k)
        eos = self.tok.decode([self.eot_token_id]) if self.tok.eot_id is not None else None
        for members in groups.values():
            params = self._sampling(requests[members[0]].args[1], eos)
            keep = self.max_length - params.max_new_tokens
            if keep <= 0:
                raise ValueError(f"generate_until: max_gen_toks={params.max_new_tokens} leaves "
                                 f"no room for a prompt in the model's context of "
                                 f"{self.max_length} tokens")
            for i in range(0, len(members), self.batch_size):
                batch = members[i:i + self.batch_size]
                prompts = [self.tok_encode(requests[k].args[0], left_truncate_len=keep)
                           or [self.prefix_token_id] for k in batch]
                texts = [""] * len(batch)
                for ev in stream(self.model, self.tok, prompts, params):
                    texts[ev.row] += ev.text
                for k, text in zip(batch, texts):
                    out[k] = text
        return out

    def _sampling(self, gen_kwargs: dict, eos: str | None) -> SamplingParams:
        """SamplingParams of one request's generation options; ValueError naming an option the
        decoder does not have."""
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kw.pop("until", None), eos=eos)
        params = SamplingParams(max_new_tokens=int(kw.pop("max_gen_toks")), temperature=0.0,
                                stop=tuple(s for s in until if s))
        kw.pop("do_sample", None)
        for key, value in kw.items():
            if key not in GEN_OPTIONS:
                raise ValueError(f"generate_until: the task asks for generation option {key}="
                                 f"{value!r}, which fastlm's decoder does not have (it has "
                                 f"until, max_gen_toks, do_sample, {', '.join(GEN_OPTIONS)})")
            setattr(params, GEN_OPTIONS[key], value)
        return params.validate()

    # ---- chat templates (--apply_chat_template) --------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.tok.hash()

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return template.jinja(self.tok) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The conversation as text, rendered from the same Jinja template the Hugging Face and
        GGUF exports carry (so `hf` on the export gets the same prompt)."""
        import jinja2
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template.jinja(self.tok)).render(
            messages=chat_history, add_generation_prompt=add_generation_prompt)


def main(argv: list[str] | None = None) -> int:
    if _IMPORT_ERROR is not None:
        raise SystemExit(f"fastlm.lm_eval_adapter: lm_eval is not installed "
                         f"(pip install lm_eval): {_IMPORT_ERROR}")
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
