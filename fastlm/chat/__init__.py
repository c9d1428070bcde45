"""Chat: the one chat template (template.py) and the terminal chat (cli.py, `python -m fastlm.chat`).
"""
