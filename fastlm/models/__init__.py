"""Model architectures, chosen by `model.arch` (fastlm.models.registry):

  gpt2, llama   decoder-only transformers (gpt.py)
  bert          bidirectional encoder with the masked-LM objective (bert.py)
  lstm, gru     recurrent LMs over torch's fused nn.LSTM / nn.GRU (rnn.py)
  gcnn          gated convolutional LM, Dauphin et al. 2017 (gcnn.py)

Every model is a fastlm.models.base.LanguageModel; the trainer only uses that interface.
"""
# Import order is registration order, which available() and error messages list.
from fastlm.models.base import LanguageModel  # noqa: I001
from fastlm.models.registry import available, build, register
from fastlm.models.gpt import GPT  # registers gpt2, llama
from fastlm.models.bert import BERT  # registers bert
from fastlm.models.rnn import RNNLM  # registers lstm, gru
from fastlm.models.gcnn import GatedCNN  # registers gcnn

__all__ = ["BERT", "GPT", "RNNLM", "GatedCNN", "LanguageModel", "available", "build", "register"]
