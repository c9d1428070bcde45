"""Models: fastlm.models.gpt.GPT (GPT-2 and Llama flavours); later bert.py, rnn.py, cnn.py."""
from fastlm.models.gpt import GPT

__all__ = ["GPT"]
