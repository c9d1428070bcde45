"""Text generation: decoding with a KV cache, sampling and batching (decode.py,
`python -m fastlm.generate`) and the caches themselves (kv_cache.py).
"""
