"""Development only: the local stand-in model (`standin.py`) and `chat-api dev` (`run.py`).

It may import anything; production code never imports it.
"""
