"""Fine-tuning: classification and instruction (SFT) fine-tuning (loop.py, `python -m fastlm.finetune`)
and LoRA adapters (lora.py).
"""
