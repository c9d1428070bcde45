"""Export: Hugging Face transformers directories (hf.py, `python -m fastlm.export`), GGUF for
llama.cpp (gguf.py) and BERT checkpoints as BertForMaskedLM (bert.py).
"""
