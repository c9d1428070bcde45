"""fastlm's byte-level BPE tokenizer: native training and encoding (fastlm._bpe), a pure-Python
reference it is tested against, exports to tiktoken and Hugging Face, and a CLI:

    from fastlm.tokenizer import Tokenizer
    tok = Tokenizer.train("data/*.txt", vocab_size=32768, pattern="gpt4",
                          special_tokens=["<|endoftext|>"])
    tok.save("tok.json"); tok = Tokenizer.load("tok.json")
    ids = tok.encode("hello world"); text = tok.decode(ids)

    python -m fastlm.tokenizer train --input data/ --vocab-size 32768 --out tok.json
"""
from fastlm.tokenizer.formats import TokenizerFileError
from fastlm.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer", "TokenizerFileError"]
