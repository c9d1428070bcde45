"""lm-evaluation-harness adapter: a fastlm checkpoint as an lm_eval model type "fastlm".

    pip install lm_eval
    python -m fastlm.lm_eval_adapter --model fastlm --model_args checkpoint=RUN_DIR \\
        --tasks hellaswag,arc_easy --batch_size 16

This module registers the model type when imported and then hands the command line to lm_eval's
own CLI (lm_eval discovers only its built-in models, so `python -m fastlm.lm_eval_adapter` stands
in for the `lm_eval` command; from Python, `import fastlm.eval.lm_eval_adapter` before
lm_eval.simple_evaluate(model="fastlm", ...) does the same).

The three request types map onto fastlm.eval's scoring, so the harness and `python -m fastlm.eval`
agree on the same model: loglikelihood -> fastlm.eval.core.loglikelihood, loglikelihood_rolling ->
fastlm.eval.core.token_nll (sliding window), generate_until -> fastlm.eval.core.generate_greedy with the
request's `until` strings checked on the decoded text.
"""
from __future__ import annotations

import sys

from fastlm.eval.core import generate_greedy, loglikelihood, token_nll
from fastlm.restore import load

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # the module stays importable so the error says what to install
    LM, register_model, _IMPORT_ERROR = object, None, exc
else:
    _IMPORT_ERROR = None


def _register(cls):
    return register_model("fastlm")(cls) if register_model is not None else cls


@_register
class FastLM(LM):
    """lm_eval model over a fastlm checkpoint (model_args: checkpoint=PATH[,device=cpu])."""

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int | str = 16,
                 max_gen_toks: int = 256, **_ignored):
        super().__init__()  # (without lm_eval the class still works on objects with .args)
        self.model, self.tok, meta = load(checkpoint, device or "cpu")
        if meta.task == "classify":
            raise ValueError(f"{meta.path} is a classifier, not a language model")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)
        eot = self.tok.eot_id
        self.prefix = [eot] if eot is not None else []  # context for an empty context string

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            ctx = self.tok.encode_ordinary(context) if context else list(self.prefix)
            pairs.append((ctx or [0], self.tok.encode_ordinary(continuation)))
        return loglikelihood(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            ids = list(self.prefix or [0]) + self.tok.encode_ordinary(req.args[0])
            out.append(-token_nll(self.model, ids, batch_size=self.batch_size).sum().item())
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = generate_greedy(self.model, self.tok.encode_ordinary(context),
                                  int(kwargs.get("max_gen_toks", self.max_gen_toks)), set(),
                                  float(kwargs.get("temperature", 0.0) or 0.0))
            text = self.tok.decode(new)
            for stop in until:  # cut at the first stop string
                text = text.split(stop)[0]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> int:
    if _IMPORT_ERROR is not None:
        raise SystemExit(f"fastlm.lm_eval_adapter: lm_eval is not installed "
                         f"(pip install lm_eval): {_IMPORT_ERROR}")
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
